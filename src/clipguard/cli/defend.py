"""``clipguard defend``: prompt defenses write a defense directory; weight-rewriting methods
(oracle repair, CleanCLIP, fine-tuning) write a model directory."""

from __future__ import annotations

import argparse

from clipguard import ClipguardError
from clipguard.cli.common import attack_for, summary_line, verify


def cmd_defend(args) -> None:
    from clipguard.outputs import check_output_directory, claim_outputs

    check_output_directory(args.out)
    with claim_outputs(args.out):
        if args.method == "oracle-repair":
            return _defend_oracle_repair(args)
        if args.method in ("cleanclip", "finetune"):
            return _defend_finetune(args)
        return _defend_prompts(args)


def _defend_prompts(args) -> None:
    from clipguard.config import load_config, override, parse_assignments
    from clipguard.data import few_shot_indices, load_fmnist
    from clipguard.defenses import get_defense_class, save_defense
    from clipguard.distributed import is_main_process
    from clipguard.eval.evaluate import evaluate_model, metrics_of, write_json
    from clipguard.models.loading import load_clip

    cls = get_defense_class(args.method)
    config = load_config(cls.config_class, args.config)
    config = override(config, shots=args.shots, seed=args.seed, device=args.device, margin=args.margin,
                      **parse_assignments(cls.config_class, args.set))
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    train = load_fmnist("train")
    shots = train.subset(few_shot_indices(train.labels, config.shots, config.seed, len(train.classes)))
    defense = cls(config, clip, train.classes).to(clip.device)
    stats = defense.fit(clip, shots)
    trigger, target = attack_for(args, clip)
    result = evaluate_model(clip, args.model, seed=args.seed, trigger=trigger, target=target, defense=defense)
    stats["evaluation"] = metrics_of(result)
    if is_main_process():
        save_defense(defense, clip, args.out, stats)
        write_json(result, args.out + "/eval.json")
    share = 100 * stats["trainable_parameters"] / stats["clip_parameters"] if "clip_parameters" in stats else float("nan")
    print(summary_line(result) + f" | {args.method}: {stats['trainable_parameters']:,} trainable parameters "
          f"({share:.2f}% of CLIP), {stats['seconds']:.0f} s; saved {args.out}")


def _defend_oracle_repair(args) -> None:
    """Oracle-guided repair changes CLIP's weights, so it writes a model directory."""
    from pathlib import Path

    from clipguard.attacks import load_trigger
    from clipguard.config import load_config, override, parse_assignments
    from clipguard.defenses.oracle import load_pool
    from clipguard.defenses.oracle_repair import (
        OracleRepairConfig, oracle_repair, save_repaired_model, write_repair_report,
    )
    from clipguard.distributed import barrier, is_main_process
    from clipguard.eval.evaluate import evaluate_model, write_json
    from clipguard.models.loading import load_clip

    if not args.pool:
        raise ClipguardError("oracle-repair needs --pool (fmnist-train:N, fmnist-test:N or an image folder)")
    config = load_config(OracleRepairConfig, args.config)
    config = override(config, seed=args.seed, device=args.device, **parse_assignments(OracleRepairConfig, args.set))
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    record = clip.config.get("attack")
    if args.pool_trigger_rate and not record:
        raise ClipguardError("--pool-trigger-rate needs a backdoored model directory (its trigger is mixed in)")
    trigger = load_trigger(args.model, record) if args.pool_trigger_rate else None
    pool, pool_info = load_pool(args.pool, clip.image_size, seed=args.seed, trigger=trigger,
                                trigger_rate=args.pool_trigger_rate)
    repaired, report = oracle_repair(clip, pool, config)
    report["pool"] = {k: v for k, v in pool_info.items() if k != "triggered"}
    if is_main_process():
        save_repaired_model(repaired, report, args.out, source_dir=args.model if Path(args.model).is_dir() else None)
        write_repair_report(report, pool, args.out)
    barrier()  # the others read the trigger from the directory rank 0 wrote
    trigger, target = attack_for(argparse.Namespace(**{**vars(args), "model": args.out}), repaired)
    result = evaluate_model(repaired, args.out, seed=args.seed, trigger=trigger, target=target)
    if is_main_process():
        write_json(result, args.out + "/eval.json")
    print(f"oracle repair: {report['verdict']}; victim labels {report.get('victim_labels')}, "
          f"compact set {report.get('compact_set_size', 0)} pairs")
    print(summary_line(result) + f"; saved {args.out}")


def _defend_finetune(args) -> None:
    """CleanCLIP and plain fine-tuning change CLIP's weights, so they write a model directory."""
    from pathlib import Path

    from clipguard.config import load_config, override, parse_assignments
    from clipguard.defenses.cleanclip import cleanclip_finetune, config_for, save_finetuned_model
    from clipguard.distributed import is_main_process
    from clipguard.eval.evaluate import evaluate_model, metrics_of, write_json
    from clipguard.models.loading import load_clip

    cls = type(config_for(args.method))
    config = load_config(cls, args.config)
    config = override(config, seed=args.seed, device=args.device, **parse_assignments(cls, args.set))
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    tuned, stats = cleanclip_finetune(clip, config)
    trigger, target = attack_for(args, clip)
    result = evaluate_model(tuned, args.out, seed=args.seed, trigger=trigger, target=target)
    stats["evaluation"] = metrics_of(result)
    if is_main_process():
        save_finetuned_model(tuned, stats, args.out, source_dir=args.model if Path(args.model).is_dir() else None)
        write_json(result, args.out + "/eval.json")
    print(summary_line(result) + f" | {args.method}: {stats['pairs']} clean pairs, {stats['steps']} steps, "
          f"{stats['seconds']:.0f} s, peak memory {stats['peak_memory_mb']:.0f} MB; saved {args.out}")
