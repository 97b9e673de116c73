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


LABELLED_HELP = ("labelled images: fmnist, fmnist-val (5,000 held-out train images), "
                 "DIR (an ImageFolder; train/ + val/ or test/ splits when present), "
                 "imagenet:DIR (synset folders) or csv:FILE (filepath,label; see --csv-*)")
CAPTIONS_HELP = ("image-caption pairs: fmnist, fmnist-web[:plain=P], csv:FILE (filepath,caption) or wds:SHARDS "
                 "(webdataset tars, {000..099})")


def add_data_args(parser: argparse.ArgumentParser, dataset_help: str = LABELLED_HELP, captions: str | None = None,
                  pool: bool = False, defaults: bool = True) -> None:
    """The data-spec flags (README, "Your data"): --dataset with --classnames/--templates, open_clip's
    CSV flags (--csv-label-key for a labelled CSV), with ``captions`` (its help) --captions; --workers. ``defaults``
    False: unset flags are None (a --config file's values then stand)."""
    from clipguard.data import default_workers

    def default(value):
        return value if defaults else None

    parser.add_argument("--dataset", default=default("fmnist"), help=dataset_help)
    parser.add_argument("--classnames", metavar="FILE", help="class names for --dataset, one per line in its class order")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates for --dataset, one per line with {} for the class")
    if captions:
        parser.add_argument("--captions", default=default("fmnist"), help=captions)
    parser.add_argument("--csv-separator", default=default(","),
                        help="separator of a csv: file (open_clip's --csv-separator; a TSV: $'\\t')")
    parser.add_argument("--csv-img-key", default=default("filepath"), help="image path column of a csv: file")
    parser.add_argument("--csv-label-key", default=default("label"), help="label column of a --dataset csv: file")
    if captions or pool:
        parser.add_argument("--csv-caption-key", default=default("caption"), help="caption column of a csv: file")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="DataLoader worker processes decoding images (0: in the main process)")


def labelled_spec(args):
    """The --dataset spec with its options, checked now (a missing path, a single class, a bad
    class-names or templates file: refused before any model is loaded)."""
    from clipguard.data import Labelled

    defaults = Labelled()
    return Labelled(args.dataset or "fmnist", args.classnames, args.templates, args.workers,
                    args.csv_separator or defaults.csv_separator, args.csv_img_key or defaults.csv_img_key,
                    args.csv_label_key or defaults.csv_label_key).check()


def captions_spec(args):
    """The --captions spec with open_clip's CSV options (which a --pool CSV uses too), checked now
    (:meth:`~clipguard.data.Captions.check`)."""
    from clipguard.data import Captions

    defaults = Captions()
    return Captions(getattr(args, "captions", None) or "fmnist", args.csv_separator or defaults.csv_separator,
                    args.csv_img_key or defaults.csv_img_key, args.csv_caption_key or defaults.csv_caption_key,
                    args.workers).check()


INPUT_FLAGS = ("model", "defense", "dataset", "captions", "pool", "classnames", "templates", "config")


def check_outputs_apart(args, outputs: dict, **inputs) -> None:
    """No output (``{flag: path}``) is, holds or lies inside an input of ``args`` (--model, a --defense,
    a data spec's file or folder, ...; ``inputs`` overrides them, e.g. a bench recipe's): resolved paths."""
    from clipguard.outputs import check_apart

    values = {name: getattr(args, name, None) for name in INPUT_FLAGS} | inputs
    check_apart(outputs, {f"--{name}": value for name, value in values.items() if value})


def verify(args) -> bool:
    """Whether loads check the sha256 digests config.json records (off with --no-verify)."""
    return not getattr(args, "no_verify", False)


def attack_for(args, clip):
    """(trigger, target class name) to evaluate: from --attack/--target, else from the model directory."""
    from clipguard.attacks import build_trigger, load_trigger
    from clipguard.attacks.poison import fit_trigger, target_of
    from clipguard.data import as_labelled, load_dataset
    from clipguard.data.classes import class_index

    record = clip.config.get("attack")
    if args.attack:
        if not args.target:
            raise ClipguardError("--attack needs --target CLASS (the class the trigger should push images to)")
        data = getattr(args, "data", None) or args.dataset
        images = load_dataset(data, "test", clip.image_size)
        class_index(images.classes, args.target, where=args.dataset)
        trigger = build_trigger(args.attack, images.image_size, seed=args.seed)
        if trigger.learned:  # learned triggers are fitted on the dataset's train split (decoded batch by batch)
            train = load_dataset(data, "train", clip.image_size)
            fit_trigger(trigger, clip, train, class_index(train.classes, args.target, where=args.dataset),
                        as_labelled(data).trigger_fit_key("train"))
        return trigger, args.target
    if record:
        return load_trigger(args.model, record), target_of(record)
    return None, None


def summary_line(record: dict, suffix: str = "") -> str:
    """One line of CA (and ASR, PA) with ``suffix``; a chance-level warning on its own line below."""
    ca = record["clean_accuracy"]
    through = f" through {record['defense']}" if record.get("defense") else ""
    where = f"{record['dataset']}/{record['split']}"
    if record.get("evaluated_on", f"the {record['split']} split") != f"the {record['split']} split":
        where = f"{record['dataset']} ({record['evaluated_on']})"  # fmnist-val's slice, or the images not drawn as shots
    line = f"{record['model']}{through} on {where}: CA {100 * ca['value']:.2f}% ({ca['correct']}/{ca['total']})"
    if "attack_success_rate" in record:
        asr, pa, attack = record["attack_success_rate"], record["poisoned_accuracy"], record["attack"]
        line += (f", {attack['name']} -> {attack['target']}: ASR {100 * asr['value']:.2f}% ({asr['hits']}/{asr['total']}), "
                 f"PA {100 * pa['value']:.2f}% [target-class images excluded]")
    line += suffix
    if record.get("warning"):
        line += f"\nWARNING: {record['warning']}"
    return line
