"""Helpers every subcommand shares: the common flags, argument types, the trigger to evaluate,
the summary line."""

from __future__ import annotations

import argparse

from clipguard import ClipguardError
from clipguard.device import check_device


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)  # argparse type: an integer >= 1
non_negative_int = _int_at_least(0)  # argparse type: an integer >= 0


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def device_name(text: str) -> str:
    """argparse type: auto, cpu, cuda, cuda:N (mps)."""
    try:
        return check_device(text)
    except ClipguardError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers on CPU)")
    parser.add_argument("--device", default="auto", type=device_name,
                        help="auto (GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--no-verify", action="store_true",
                        help="load model and defense files even if they changed since clipguard wrote them")


def verify(args) -> bool:
    """Whether loads check the sha256 digests config.json records (off with --no-verify)."""
    return not getattr(args, "no_verify", False)


def attack_for(args, clip):
    """(trigger, target class name) to evaluate: from --attack/--target, else from the model directory."""
    from clipguard.attacks import build_trigger, load_trigger
    from clipguard.attacks.poison import fit_trigger, target_of
    from clipguard.data import load_dataset, load_fmnist
    from clipguard.data.classes import class_index

    record = clip.config.get("attack")
    if args.attack:
        if not args.target:
            raise ClipguardError("--attack needs --target CLASS (the class the trigger should push images to)")
        images = load_dataset(args.dataset, "test", clip.image_size)
        class_index(images.classes, args.target, where=args.dataset)
        trigger = build_trigger(args.attack, images.image_size, seed=args.seed)
        if trigger.learned:  # learned triggers are fitted on Fashion-MNIST's train split
            train = load_fmnist("train")
            fit_trigger(trigger, clip, train, class_index(train.classes, args.target, where="Fashion-MNIST"))
        return trigger, args.target
    if record:
        return load_trigger(args.model, record), target_of(record)
    return None, None


def summary_line(record: dict, suffix: str = "") -> str:
    """One line of CA (and ASR, PA) with ``suffix``; a chance-level warning on its own line below."""
    ca = record["clean_accuracy"]
    through = f" through {record['defense']}" if record.get("defense") else ""
    where = f"{record['dataset']}/{record['split']}"
    if "not drawn as shots" in record.get("evaluated_on", ""):
        where = f"{record['dataset']} ({record['evaluated_on']})"
    line = f"{record['model']}{through} on {where}: CA {100 * ca['value']:.2f}% ({ca['correct']}/{ca['total']})"
    if "attack_success_rate" in record:
        asr, pa, attack = record["attack_success_rate"], record["poisoned_accuracy"], record["attack"]
        line += (f", {attack['name']} -> {attack['target']}: ASR {100 * asr['value']:.2f}% ({asr['hits']}/{asr['total']}), "
                 f"PA {100 * pa['value']:.2f}% [target-class images excluded]")
    line += suffix
    if record.get("warning"):
        line += f"\nWARNING: {record['warning']}"
    return line
