"""The smaller subcommands and ``main``, which parses (:mod:`clipguard.cli.parser`) and runs one."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path

from clipguard import ClipguardError
from clipguard.cli.common import (
    attack_for, captions_spec, check_outputs_apart, labelled_spec, summary_line, verify,
)
# the commands defined elsewhere: main runs cmd_<name> from this module's names
from clipguard.cli.defend import cmd_defend  # noqa: F401
from clipguard.cli.diagnose import cmd_analyze, cmd_detect, cmd_show_triggers  # noqa: F401
from clipguard.cli.listing import cmd_list  # noqa: F401
from clipguard.cli.parser import build_parser


def cmd_train_builtin(args) -> None:
    from clipguard.config import load_config, override, to_yaml
    from clipguard.models.builtin import BuiltinRecipe, train_builtin
    from clipguard.models.loading import save_clip
    from clipguard.locks import claim_outputs
    from clipguard.outputs import check_output_directory, check_run_directory

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
    from clipguard import pipeline
    from clipguard.distributed import is_main_process
    from clipguard.outputs import check_output_file, check_sidecar_json, write_record

    if args.json:
        check_outputs_apart(args, {"--json": args.json})
        check_sidecar_json(check_output_file(args.json, (".json",), "--json"), "--json")
    args.data = labelled_spec(args)
    clip = pipeline.load_model(args.model, device=args.device, verify=verify(args))
    trigger, target = attack_for(args, clip)
    defended = pipeline.load_defended(clip, args.defense, args.data, args.split, verify=verify(args))
    record = pipeline.evaluate(defended, trigger=trigger, target=target, dataset=args.data, split=args.split,
                               limit=args.limit, seed=args.seed, batch_size=args.batch_size, name=args.model)
    if args.json and is_main_process():
        write_record(record, args.json, "evaluation")
    print(summary_line(record, f" in {record['seconds']:.1f} s"))


def cmd_attack(args) -> None:
    from clipguard import pipeline
    from clipguard.attacks import AttackConfig, get_trigger_class
    from clipguard.config import load_config, override, parse_assignments
    from clipguard.locks import claim_outputs
    from clipguard.outputs import check_output_directory, check_run_directory, remove_run_directory

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
    pipeline.check_attack_target(config, captions, dataset)
    with claim_outputs(out, run_dir):
        clip = pipeline.load_model(args.model, device=args.device, verify=verify(args))
        with _resume_hint(run_dir, "attack"):
            record, result = pipeline.attack(clip, config, args.out, trigger_overrides, run_dir=run_dir,
                                             resume=args.resume, captions=captions, dataset=dataset, seed=args.seed)
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
    from clipguard.locks import claim_outputs
    from clipguard.outputs import check_bench_directory

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
    config.labelled.check()  # the recipe's or the flags' data, checked before any work (files listed only)
    config.caption_spec.check()
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
    from clipguard.locks import claim_outputs
    from clipguard.outputs import check_bench_directory

    check_bench_directory(args.out)
    config = demo_config(seed=args.seed, device=args.device)
    print(f"clipguard demo: {', '.join(config.attacks)} x {', '.join(config.defenses)} on the built-in CLIP "
          f"(a shortened attack recipe, first {config.limit} test images; `clipguard bench` runs the full one)")
    with claim_outputs(args.out):
        run_bench(config, args.out)
    _print_report(args.out)


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


def _command(name: str):
    """The function that runs subcommand ``name`` (``train-builtin`` -> ``cmd_train_builtin``), looked up
    when it runs."""
    return globals()[f"cmd_{name.replace('-', '_')}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(arg in ("-v", "--verbose") for arg in argv)
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        with _torchrun_processes(args):
            _command(args.command)(args)
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
