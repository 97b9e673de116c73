"""Helpers every subcommand shares: the common flags, the trigger to evaluate, the summary line."""

from __future__ import annotations

import argparse

from clipguard import ClipguardError


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers on CPU)")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:N")


def attack_for(args, clip):
    """(trigger, target index) to evaluate: from --attack/--target, else from the model directory."""
    from clipguard.attacks import build_trigger, load_trigger
    from clipguard.attacks.poison import class_index, fit_trigger
    from clipguard.data import load_dataset

    record = clip.config.get("attack")
    if args.attack:
        if not args.target:
            raise ClipguardError("--attack needs --target CLASS (the class the trigger should push images to)")
        images = load_dataset(args.dataset, "test", clip.image_size)
        target = class_index(images.classes, args.target)
        trigger = build_trigger(args.attack, images.image_size, seed=args.seed)
        if trigger.learned:
            from clipguard.data import load_fmnist

            fit_trigger(trigger, clip, load_fmnist("train"), target)
        return trigger, target
    if record:
        return load_trigger(args.model, record), record["target_index"]
    return None, None


def summary_line(record: dict) -> str:
    ca = record["clean_accuracy"]
    line = f"{record['model']} on {record['dataset']}/{record['split']}: CA {100 * ca['value']:.2f}% ({ca['correct']}/{ca['total']})"
    if "attack_success_rate" in record:
        asr, pa, attack = record["attack_success_rate"], record["poisoned_accuracy"], record["attack"]
        line += (f", {attack['name']} -> {attack['target']}: ASR {100 * asr['value']:.2f}% ({asr['hits']}/{asr['total']}), "
                 f"PA {100 * pa['value']:.2f}% [target-class images excluded]")
    return line
