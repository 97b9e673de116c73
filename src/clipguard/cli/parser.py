"""The ``clipguard`` argument parser: one subparser per command; ``args.command`` names the one
given, and :func:`clipguard.cli.main.main` runs it (the commands live there, not here)."""

from __future__ import annotations

import argparse

from clipguard import ClipguardError, __version__
from clipguard.cli.common import (
    CAPTIONS_HELP, add_common_args, add_data_args, fraction, non_negative_int, positive_int,
)


LABELLED_SPECS = "fmnist, DIR, imagenet:DIR or csv:FILE"


class _Parser(argparse.ArgumentParser):
    """argparse with clipguard's one-line errors (``clipguard: error: ...``) instead of usage + exit."""

    def error(self, message: str):
        raise ClipguardError(f"{self.prog.removeprefix('clipguard ') or 'clipguard'}: {message} "
                             f"(see '{self.prog} --help')")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """A flag's default in its help, where it has one (not None / False) its help does not state."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clipguard", description="Find, measure and remove backdoors in CLIP.")
    parser.add_argument("--version", action="version", version=f"clipguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, formatter_class=_HelpFormatter, **k)

    p = sub.add_parser("train-builtin", help="train the built-in Fashion-MNIST CLIP from scratch")
    add_common_args(p)
    p.add_argument("--config", help="YAML recipe (BuiltinRecipe fields); flags override it")
    p.add_argument("--out", default="runs/builtin", help="run directory (checkpoint + model/)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--train-images", type=positive_int, help="train on the first N images only")
    p.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype of saved weights")

    p = sub.add_parser("evaluate", help="zero-shot clean accuracy of a model")
    add_common_args(p)
    p.add_argument("--model", default="builtin", help="model spec (see 'clipguard list')")
    add_data_args(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=positive_int, default=1000)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--attack", help="also measure ASR/PA of this attack's trigger (default: the model's own attack)")
    p.add_argument("--target", help="target class for --attack")
    p.add_argument("--defense", help="a defense directory to apply (from 'clipguard defend')")

    p = sub.add_parser("attack", help="backdoor a model by poisoned contrastive fine-tuning")
    add_common_args(p)
    p.add_argument("--config", help="YAML AttackConfig; flags override it")
    p.add_argument("--model", default="builtin", help="clean model spec")
    p.add_argument("--attack", help="attack name (clipguard list)")
    p.add_argument("--target", help="target class name (default bag)")
    p.add_argument("--poison-rate", type=fraction,
                   help="fraction of pairs poisoned (default 0.03; 0: a clean fine-tune with the same recipe, a control)")
    p.add_argument("--pairs", type=positive_int, help="fine-tuning pairs (default 10000)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a field of the attack's trigger config, repeatable ('clipguard list --settings ATTACK' lists them)")
    add_data_args(p, "the labelled images the backdoored model is evaluated on; with a caption corpus "
                     "(--captions) also the attacker's classes, the target among them", captions=CAPTIONS_HELP
                  + ": the poisoning corpus")
    p.add_argument("--out", required=True, help="backdoored model directory to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune")

    p = sub.add_parser("defend", help="purify a suspect model (few clean shots; cleanclip/finetune: clean pairs)")
    add_common_args(p)
    p.add_argument("--model", default="builtin", help="suspect model (a backdoored model directory)")
    p.add_argument("--method", required=True, help="defense name (clipguard list)")
    p.add_argument("--config", help="YAML config of the method; flags override it")
    p.add_argument("--shots", type=positive_int, help="clean labelled images per class (default 16)")
    p.add_argument("--margin", type=float, help="RVPT margin variant max(L_FR_i, m)")
    p.add_argument("--pool", help="oracle-repair: unlabelled pool, any data spec (fmnist-train:N, a folder, csv:FILE, "
                                  "wds:SHARDS); labels and captions are ignored")
    p.add_argument("--pool-size", type=positive_int,
                   help="oracle-repair: seeded images of the pool (default 2000; fmnist-train:N names its own)")
    p.add_argument("--pool-trigger-rate", type=fraction, default=0.0,
                   help="oracle-repair: mix the model's own trigger into this share of the pool (a simulation)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a field of the method's config, repeatable ('clipguard list --settings METHOD' lists them)")
    add_data_args(p, "labelled images (" + LABELLED_SPECS + "): shots from its train split and evaluation on its "
                     "val/test split; without splits, evaluation on the images not drawn as shots",
                  captions=CAPTIONS_HELP + ": cleanclip/finetune's clean pairs")
    p.add_argument("--attack", help="also measure this attack's ASR (default: the model's own attack)")
    p.add_argument("--target", help="target class for --attack")
    p.add_argument("--out", required=True, help="defense directory to write (a model directory for weight-rewriting methods)")

    p = sub.add_parser("detect", help="invert a trigger on clean shots: is the model backdoored, and towards what?")
    add_common_args(p)
    p.add_argument("--model", default="builtin", help="suspect model")
    p.add_argument("--shots", type=positive_int, default=16, help="clean labelled images per class")
    add_data_args(p, "where the shots come from (" + LABELLED_SPECS + "; its train split when it has one)")
    p.add_argument("--reference", metavar="MODEL",
                   help="the clean base model the suspect claims to come from (any --model spec): calibrate against it "
                        "(default: on the suspect's own classes)")
    p.add_argument("--detectors", nargs="+", metavar="NAME",
                   help="registered detectors to run (default: every one the data allows; 'clipguard list')")
    p.add_argument("--config", help="YAML InversionConfig of the patch detector; flags override it")
    p.add_argument("--set", action="append", metavar="[DETECTOR.|verdict.]FIELD=VALUE",
                   help="a setting, repeatable: FIELD=V the patch inversion's ('clipguard list --settings detect'), "
                        "DETECTOR.FIELD=V another detector's (full-image.steps=50), verdict.FIELD=V the "
                        "calibration's (verdict.backdoored_at=2.5, verdict.targeted.steps=50)")
    p.add_argument("--out", default="detection.png", help="PNG of the inverted triggers (+ a .json beside it)")

    p = sub.add_parser("analyze", help="perturbation resistivity per layer (and t-SNE) with and without defenses")
    add_common_args(p)
    p.add_argument("what", choices=["pr"], help="pr: perturbation resistivity")
    p.add_argument("--model", default="builtin", help="suspect model (its own attack's trigger is one perturbation)")
    p.add_argument("--defense", action="append", help="a defense directory to compare, repeatable")
    p.add_argument("--attack", help="trigger to use when the model records none")
    p.add_argument("--target", help="target class for --attack")
    add_data_args(p, "the test images (" + LABELLED_SPECS + ")")
    p.add_argument("--images", type=positive_int, default=500, help="test images (non-target classes)")
    p.add_argument("--out", default="pr.png")
    p.add_argument("--tsne", help="also write a t-SNE plot of clean vs triggered features here")

    p = sub.add_parser("show-triggers", help="draw a clean image and its triggered version per attack")
    add_common_args(p)
    p.add_argument("--model", default="builtin", help="clean model (learned triggers are fitted against it)")
    p.add_argument("--target", default="bag")
    p.add_argument("--attacks", nargs="*", help="attack names (default: all)")
    add_data_args(p, "the image shown (its test split) and what learned triggers fit on (its train split)")
    p.add_argument("--out", default="triggers.png")

    p = sub.add_parser("bench", help="every attack x every defense x seeds: cached, resumable, with a report")
    add_common_args(p)
    p.set_defaults(seed=None)  # unset flags leave a --config recipe's values
    p.add_argument("--config", help="YAML BenchConfig recipe (e.g. recipes/public-protocol.yaml); flags override it")
    p.add_argument("--model", help="the clean model every attack starts from (default builtin)")
    p.add_argument("--attacks", nargs="+", help="attack names or 'all' (default)")
    p.add_argument("--defenses", nargs="+", help="defense names, 'none' = no defense, or 'all' (default)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: --seed, 0)")
    p.add_argument("--shots", type=positive_int, help="clean labelled images per class for few-shot defenses (default 16)")
    p.add_argument("--limit", type=positive_int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--pool", help="oracle-repair's unlabelled pool, any data spec (default fmnist-train:2000)")
    p.add_argument("--pool-size", type=positive_int, help="oracle-repair: seeded images of the pool (default 2000)")
    p.add_argument("--pool-trigger-rate", type=fraction, help="oracle-repair: triggered share of the pool (default 0.1)")
    p.add_argument("--pr-images", type=non_negative_int, help="images for the PR curves (0: none; default 200)")
    add_data_args(p, "labelled images (" + LABELLED_SPECS + "): the shots and the evaluation", defaults=False,
                  captions=CAPTIONS_HELP + ": the attacks' poisoning corpus and the clean pairs")
    p.add_argument("--set", action="append", metavar="attack.FIELD=V|METHOD.FIELD=V",
                   help="attack or defense setting, repeatable (attack.train.epochs=3, rvpt.lr=0.05)")
    p.add_argument("--out", default="runs/bench", help="results directory (also the cache: re-run to resume)")

    p = sub.add_parser("demo", help="the main job on the built-in model: attack, defend, report (about 8 min on 2 idle cores; longer under load)")
    add_common_args(p)
    p.add_argument("--out", default="runs/demo", help="results directory (re-run to resume)")

    p = sub.add_parser("list", help="what can be loaded and run")
    p.add_argument("--open-clip", action="store_true", help="also list open_clip's pretrained tags")
    p.add_argument("--settings", metavar="NAME",
                   help="the --set fields of an attack's trigger, a defense, 'attack' (AttackConfig) or 'detect'")
    return parser
