"""The ``clipguard`` parser, the smaller subcommands and ``main``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from pathlib import Path

from clipguard import ClipguardError, __version__
from clipguard.cli.common import (
    CAPTIONS_HELP, add_common_args, add_data_args, attack_for, captions_spec, check_captions, check_outputs_apart,
    fraction, labelled_spec, non_negative_int, positive_int, summary_line, verify,
)
from clipguard.cli.defend import cmd_defend
from clipguard.cli.diagnose import cmd_analyze, cmd_detect, cmd_show_triggers
from clipguard.cli.listing import cmd_list


def cmd_train_builtin(args) -> None:
    from clipguard.config import load_config, override, to_yaml
    from clipguard.models.builtin import BuiltinRecipe, train_builtin
    from clipguard.models.loading import save_clip
    from clipguard.outputs import check_output_directory, check_run_directory, claim_outputs

    model_dir = Path(args.out) / "model"
    check_outputs_apart(args, {"--out": args.out})
    check_run_directory(args.out, allowed=["model", ".model.lock"])
    check_output_directory(model_dir, "--out", kind="clipguard.model")
    recipe = load_config(BuiltinRecipe, args.config)
    recipe = override(recipe, train_images=args.train_images)
    recipe = override(recipe, **{
        "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "train.seed": args.seed, "train.device": args.device, "train.checkpoint_every": args.checkpoint_every,
    })
    with claim_outputs(args.out, model_dir):
        print(to_yaml(recipe), end="")
        with _resume_hint(Path(args.out), "train-builtin"):
            clip, result = train_builtin(recipe, run_dir=args.out, resume=args.resume)
        import torch

        save_clip(clip.cpu(), model_dir, dtype=getattr(torch, args.dtype))
    print(f"trained {result.steps} steps in {result.seconds:.0f} s (last epoch loss {result.last_loss:.3f}); "
          f"saved {model_dir}")


def cmd_evaluate(args) -> None:
    from clipguard.distributed import is_main_process
    from clipguard.eval.evaluate import evaluate_model
    from clipguard.models.loading import load_clip
    from clipguard.outputs import check_output_file, check_sidecar_json, write_record

    if args.json:
        check_outputs_apart(args, {"--json": args.json})
        check_sidecar_json(check_output_file(args.json, (".json",), "--json"), "--json")
    args.data = labelled_spec(args)
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    trigger, target = attack_for(args, clip)
    defense = None
    if args.defense:
        from clipguard.data import load_dataset
        from clipguard.defenses import load_defense

        defense = load_defense(args.defense, clip, load_dataset(args.data, args.split, clip.image_size).classes,
                               verify=verify(args))
    record = evaluate_model(clip, args.model, args.data, args.split, args.limit, args.seed, args.batch_size,
                            trigger=trigger, target=target, defense=defense)
    if args.json and is_main_process():
        write_record(record, args.json, "evaluation")
    print(summary_line(record, f" in {record['seconds']:.1f} s"))


def cmd_attack(args) -> None:
    from clipguard.attacks import AttackConfig, get_trigger_class, run_attack, save_backdoored
    from clipguard.config import load_config, override, parse_assignments
    from clipguard.eval.evaluate import evaluate_model, metrics_of, write_json
    from clipguard.models.loading import load_clip
    from clipguard.outputs import check_output_directory, check_run_directory, claim_outputs, remove_run_directory

    out, run_dir = Path(args.out), Path(args.out + ".run")
    check_outputs_apart(args, {"--out": out, "--out (its .run checkpoint folder)": run_dir})
    check_output_directory(out, kind="clipguard.model")
    check_run_directory(run_dir, allowed=[], flag="--out (its .run checkpoint folder)")
    config = load_config(AttackConfig, args.config, section="attack")
    config = override(config, attack=args.attack, target=args.target, poison_rate=args.poison_rate, seed=args.seed,
                      pairs=args.pairs)
    config = override(config, **{"train.epochs": args.epochs, "train.lr": args.lr, "train.device": args.device})
    config.check()
    trigger_flags = [flag for flag, value in (("--attack", args.attack), ("--target", args.target), ("--set", args.set))
                     if value]
    if config.clean and trigger_flags:
        raise ClipguardError(f"--poison-rate 0 is a clean fine-tune (no trigger, no target): drop "
                             f"{', '.join(trigger_flags)}, or give a rate above 0 to attack")
    trigger_overrides = {} if config.clean else parse_assignments(get_trigger_class(config.attack).config_class, args.set)
    dataset, captions = labelled_spec(args), captions_spec(args)
    check_captions(captions)
    from clipguard.data import FMNIST_CLASSES, load_dataset
    from clipguard.data.classes import class_index

    # the attacker's classes: the built-in corpus's own, else --dataset's; the target must be one
    own = str(captions) == "fmnist"
    classes = FMNIST_CLASSES if own else load_dataset(dataset, "test").classes
    if not config.clean:
        class_index(classes, config.target, where=f"the attacker's classes ({args.captions if own else args.dataset})")
    with claim_outputs(out, run_dir):
        clip = load_clip(args.model, device=args.device, verify=verify(args))
        with _resume_hint(run_dir, "attack"):
            clip, trigger, record = run_attack(clip, config, trigger_overrides, run_dir=run_dir, resume=args.resume,
                                               captions=captions, dataset=dataset)
        clip.eval()
        result = evaluate_model(clip, args.out, dataset, seed=args.seed, trigger=trigger, target=record.get("target"))
        record["evaluation"] = metrics_of(result)
        save_backdoored(clip, trigger, record, out)
        write_json(result, out / "eval.json")
        remove_run_directory(run_dir)  # the finished run's checkpoint
    if config.clean:
        print(summary_line(result, f" | clean fine-tune: {record['total_pairs']} pairs, none poisoned, "
                                   f"{record['finetune_seconds']:.0f} s; saved {args.out}"))
        return
    decoys = f" (+ {record['decoy_pairs']} untriggered decoys)" if record.get("decoy_pairs") else ""
    print(summary_line(result, f" | {record['poisoned_pairs']}/{record['total_pairs']} pairs poisoned{decoys}, "
                               f"trigger {record['trigger_seconds']:.0f} s + fine-tune {record['finetune_seconds']:.0f} s; "
                               f"saved {args.out}"))


@contextlib.contextmanager
def _resume_hint(run_dir: Path, command: str):
    """On Ctrl-C, say whether a checkpoint was left and that --resume continues from it."""
    try:
        yield
    except KeyboardInterrupt:
        checkpoint = run_dir / "checkpoint.pt"
        if checkpoint.is_file():
            raise Interrupted(f"{checkpoint} holds the last checkpoint: run the same {command} command with "
                              "--resume to continue from it") from None
        raise Interrupted("no checkpoint was written yet: nothing to resume") from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the user can do next."""


def cmd_bench(args) -> None:
    from clipguard.bench import BenchConfig, all_defenses, parse_bench_settings, run_bench
    from clipguard.attacks import ATTACKS
    from clipguard.config import load_config, override
    from clipguard.outputs import check_bench_directory, claim_outputs

    check_bench_directory(args.out)
    try:
        config = load_config(BenchConfig, args.config)
        config = override(
            config, model=args.model, seeds=args.seeds or ([args.seed] if args.seed is not None else None),
            attacks=None if args.attacks is None else sorted(ATTACKS) if args.attacks == ["all"] else args.attacks,
            defenses=None if args.defenses is None else all_defenses() if args.defenses == ["all"] else args.defenses,
            shots=args.shots, limit=args.limit, pool=args.pool, pool_size=args.pool_size,
            pool_trigger_rate=args.pool_trigger_rate, pr_images=args.pr_images, device=args.device,
            dataset=args.dataset, captions=args.captions, classnames=args.classnames, templates=args.templates,
            csv_separator=args.csv_separator, csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
            csv_label_key=args.csv_label_key,
            workers=args.workers)
        config.__post_init__()
    except ValueError as err:
        raise ClipguardError(str(err)) from None
    check_outputs_apart(args, {"--out": args.out}, model=config.model, dataset=config.dataset,
                        captions=config.captions, pool=config.pool, classnames=config.classnames,
                        templates=config.templates)
    config.labelled.load("test", 28)  # the recipe's or the flags' data, checked before any work (files listed only)
    check_captions(config.caption_spec)
    config = parse_bench_settings(config, args.set)
    with claim_outputs(args.out):
        run_bench(config, args.out)
    _print_report(args.out)


def _print_report(out: str) -> None:
    from clipguard.eval.report import REPORT_HTML, RESULTS_MD

    if Path(out, RESULTS_MD).is_file():  # rank 0 wrote it (the others only computed)
        print(Path(out, RESULTS_MD).read_text(), end="")
        print(f"wrote {out}/{RESULTS_MD}, {out}/results.json, {out}/{REPORT_HTML} and the figures")


def cmd_demo(args) -> None:
    """The main job on the built-in model: attack (BadNet, BadCLIP), defend (RVPT, CBPT), report."""
    from clipguard.bench import demo_config, run_bench
    from clipguard.outputs import check_bench_directory, claim_outputs

    check_bench_directory(args.out)
    config = demo_config(seed=args.seed, device=args.device)
    print(f"clipguard demo: {', '.join(config.attacks)} x {', '.join(config.defenses)} on the built-in CLIP "
          f"(a shortened attack recipe, first {config.limit} test images; `clipguard bench` runs the full one)")
    with claim_outputs(args.out):
        run_bench(config, args.out)
    _print_report(args.out)


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
    p.set_defaults(func=cmd_train_builtin)

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
    p.set_defaults(func=cmd_evaluate)

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
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("defend", help="purify a suspect model (few clean shots; cleanclip/finetune: clean pairs)")
    add_common_args(p)
    p.add_argument("--model", default="builtin", help="suspect model (a backdoored model directory)")
    p.add_argument("--method", required=True, help="defense name (clipguard list)")
    p.add_argument("--config", help="YAML config of the method; flags override it")
    p.add_argument("--shots", type=positive_int, help="clean labelled images per class (default 16)")
    p.add_argument("--margin", type=float, help="RVPT margin variant max(L_FR_i, m)")
    p.add_argument("--pool", help="oracle-repair: unlabelled pool, any data spec (fmnist-train:N, a folder, csv:FILE, "
                                  "wds:SHARDS); labels and captions are ignored")
    p.add_argument("--pool-size", type=positive_int, default=2000, help="oracle-repair: seeded images of the pool")
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
    p.set_defaults(func=cmd_defend)

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
    p.set_defaults(func=cmd_detect)

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
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("show-triggers", help="draw a clean image and its triggered version per attack")
    add_common_args(p)
    p.add_argument("--model", default="builtin", help="clean model (learned triggers are fitted against it)")
    p.add_argument("--target", default="bag")
    p.add_argument("--attacks", nargs="*", help="attack names (default: all)")
    add_data_args(p, "the image shown (its test split) and what learned triggers fit on (its train split)")
    p.add_argument("--out", default="triggers.png")
    p.set_defaults(func=cmd_show_triggers)

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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job on the built-in model: attack, defend, report (about 8 min on 2 idle cores; longer under load)")
    add_common_args(p)
    p.add_argument("--out", default="runs/demo", help="results directory (re-run to resume)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("list", help="what can be loaded and run")
    p.add_argument("--open-clip", action="store_true", help="also list open_clip's pretrained tags")
    p.add_argument("--settings", metavar="NAME",
                   help="the --set fields of an attack's trigger, a defense, 'attack' (AttackConfig) or 'detect'")
    p.set_defaults(func=cmd_list)
    return parser


@contextlib.contextmanager
def _torchrun_processes(args):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group before any model is loaded (so
    each process loads onto its own GPU), print from rank 0 only, and end all processes together.
    Nothing happens in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from clipguard.distributed import close_distributed, init_distributed

    info, _ = init_distributed(getattr(args, "device", "auto"))
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(sys.stdout if info.is_main else quiet):
            yield
    except BaseException:
        close_distributed(wait=False)  # the others may never reach a barrier: leave without one
        raise
    close_distributed()


def _write_failed(err: Exception) -> bool:
    """No space left on device: as an OSError, as torch.save's RuntimeError from its zip writer, or
    as safetensors' SafetensorError ("I/O error: No space left on device (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    if isinstance(err, RuntimeError) and ("inline_container" in text or "file write failed" in text):
        return True
    return type(err).__name__ == "SafetensorError" and any(
        f"(os error {code})" in text for code in (errno.ENOSPC, errno.EDQUOT))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(arg in ("-v", "--verbose") for arg in argv)
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        with _torchrun_processes(args):
            args.func(args)
    except ClipguardError as err:
        print(f"clipguard: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"clipguard: interrupted; {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("clipguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `clipguard list | head`): nothing to report
        sys.stdout = open(os.devnull, "w")
        return 141
    except Exception as err:  # a bug or an input no check caught: still one line, the traceback with -v
        if verbose:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        if _write_failed(err):
            print(f"clipguard: error: writing a file failed ({first}); the usual cause is a full disk: free space or "
                  "write --out to another disk, and rerun", file=sys.stderr)
            return 2
        print(f"clipguard: error: unexpected {type(err).__name__}: {first} (rerun with -v for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1
    return 0
