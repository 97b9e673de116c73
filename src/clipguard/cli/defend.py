"""``clipguard defend``: fit any registered defense for a suspect model, evaluate, save.

A defense on top of the suspect (prompts, a head) writes a defense directory; one that rewrites
the weights (oracle repair, CleanCLIP, fine-tuning) writes a model directory. The command does
not tell them apart: :mod:`clipguard.pipeline` and the defense's class attributes do.
"""

from __future__ import annotations

import dataclasses

from clipguard import ClipguardError
from clipguard.cli.common import (
    attack_for, captions_spec, check_outputs_apart, labelled_spec, summary_line, verify,
)

# defend's own flags that set a field of the method's config, when the method has that field
CONFIG_FLAGS = {"shots": "--shots", "margin": "--margin"}


def cmd_defend(args) -> None:
    from clipguard import pipeline
    from clipguard.config import load_config, override, parse_assignments
    from clipguard.data import Captions
    from clipguard.data.pool import DefenderData, Unlabelled
    from clipguard.defenses import get_defense_class
    from clipguard.distributed import is_main_process
    from clipguard.locks import claim_outputs
    from clipguard.outputs import check_output_directory

    check_outputs_apart(args, {"--out": args.out})
    cls = get_defense_class(args.method)
    check_output_directory(args.out, kind="clipguard.model" if cls.rewrites_weights else "clipguard.defense")
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    flags = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    for name in flags.keys() - fields:
        raise ClipguardError(f"{CONFIG_FLAGS[name]} does not apply to {args.method} (its settings: {sorted(fields)})")
    if cls.data != "pool" and (args.pool or args.pool_trigger_rate):
        raise ClipguardError(f"--pool and --pool-trigger-rate are for pool defenses; {args.method} does not take one")
    if cls.data == "pool" and not args.pool:
        raise ClipguardError(f"{args.method} needs --pool (fmnist-train:N, a folder, csv:FILE or wds:SHARDS)")
    if cls.data != "pairs" and Captions(args.captions or "fmnist").key():  # a corpus other than the default named
        raise ClipguardError(f"--captions is for pairs defenses (cleanclip, finetune); {args.method} learns from "
                             f"{'--pool' if cls.data == 'pool' else 'shots of --dataset'}")
    config = load_config(cls.config_class, args.config)
    config = override(config, seed=args.seed, device=args.device, **flags, **parse_assignments(cls.config_class, args.set))
    args.data, captions = labelled_spec(args), captions_spec(args)
    if args.pool_size is not None and not args.pool:
        raise ClipguardError("--pool-size is the size of --pool; give --pool too")
    pool = args.pool and Unlabelled.given(args.pool, args.pool_size, args.pool_trigger_rate, captions, args.workers)
    data = DefenderData(args.data, captions, pool or None)
    with claim_outputs(args.out):
        suspect = pipeline.load_model(args.model, device=args.device, verify=verify(args))
        trigger, target = attack_for(args, suspect)
        defended = pipeline.defend(suspect, args.method, config=config, data=data, suspect_dir=args.model)
        name = args.out if cls.rewrites_weights else args.model
        result = pipeline.evaluate(defended, trigger=trigger, target=target, dataset=args.data, seed=args.seed,
                                   name=name)
        if is_main_process():
            pipeline.save(defended, args.out, evaluation=result)
    if cls.rewrites_weights:
        print(defended.defense.summary(defended.stats))
        print(summary_line(result, f"; saved {args.out}"))
    else:
        print(summary_line(result, f" | {defended.defense.summary(defended.stats)}; saved {args.out}"))
