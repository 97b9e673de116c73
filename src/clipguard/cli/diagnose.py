"""``clipguard detect``, ``analyze`` and ``show-triggers``: what a suspect model does, as figures and JSON."""

from __future__ import annotations

from pathlib import Path

from clipguard.cli.common import attack_for, check_outputs_apart, labelled_spec, verify


def cmd_show_triggers(args) -> None:
    from clipguard.attacks import ATTACKS, build_trigger
    from clipguard.attacks.poison import fit_trigger
    from clipguard.data import load_dataset
    from clipguard.data.classes import class_index
    from clipguard.eval.plots import example_index, plot_trigger_grid
    from clipguard.models.loading import load_clip
    from clipguard.outputs import check_output_file

    check_outputs_apart(args, {"--out": args.out})
    check_output_file(args.out, (".png",))
    dataset = labelled_spec(args)
    clip = load_clip(args.model, device="cpu", verify=verify(args))
    size = 28 if args.dataset == "fmnist" else clip.image_size
    train, test = load_dataset(dataset, "train", size), load_dataset(dataset, "test", size)
    target = class_index(test.classes, args.target, where=args.dataset)
    triggers = []
    for name in args.attacks or sorted(ATTACKS):
        trigger = build_trigger(name, test.image_size, seed=args.seed)
        triggers.append(fit_trigger(trigger, clip, train, target))
    image = test.float_images(example_index(test, target, args.seed))
    plot_trigger_grid(image, triggers, args.out)
    print(f"wrote {args.out} ({len(triggers)} attacks)")


def _figure_outputs(args, *flags: str) -> None:
    """Check each figure flag (a .png) and the .json written beside the first one."""
    from clipguard.outputs import check_output_file, check_sidecar_json

    values = {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in flags}
    check_outputs_apart(args, {flag: value for flag, value in values.items() if value}
                        | {"--out (its .json)": Path(args.out).with_suffix(".json")})
    for flag, value in values.items():
        if value:
            check_output_file(value, (".png",), flag)
    check_sidecar_json(Path(args.out).with_suffix(".json"), "--out")


def cmd_analyze(args) -> None:
    import torch

    from clipguard.data import load_dataset
    from clipguard.data.classes import class_index
    from clipguard.defenses import DefendedClip, load_defense
    from clipguard.eval.analysis import perturbations, plot_resistivity, plot_tsne, resistivity
    from clipguard.models.loading import load_clip
    from clipguard.outputs import write_record

    _figure_outputs(args, "--out", "--tsne")
    args.data = labelled_spec(args)
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    trigger, target = attack_for(args, clip)
    test = load_dataset(args.data, "test", clip.image_size)
    index = class_index(test.classes, target, where=args.dataset) if target is not None else None
    keep = torch.nonzero(test.labels != index).flatten() if index is not None else torch.arange(len(test))
    chosen = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(args.seed))[: args.images]]
    images, labels = test.float_images(chosen), test.labels[chosen]
    models = {"suspect model": DefendedClip(clip)}
    for path in args.defense or []:
        defense = load_defense(path, clip, test.classes, verify=verify(args))
        models[f"{defense.name} ({path})"] = DefendedClip(clip, defense)
    results = {label: resistivity(model, images, perturbations(trigger, args.seed)) for label, model in models.items()}
    plot_resistivity(results, args.out)
    write_record({"model": args.model, "images": len(images), "seed": args.seed, "resistivity": results},
                 Path(args.out).with_suffix(".json"), "resistivity")
    print(f"wrote {args.out} (PR per block, {len(images)} images)")
    if args.tsne and trigger is not None:
        if target is not None:
            trigger.generator.manual_seed(args.seed)
        plot_tsne(models, images, labels, trigger(images.clone()), test.classes, args.tsne, args.seed)
        print(f"wrote {args.tsne}")


def cmd_detect(args) -> None:
    from clipguard.config import load_config, override, parse_assignments
    from clipguard.detection.inversion import InversionConfig, detect_backdoor, save_detection_figure
    from clipguard.pipeline import draw_shots
    from clipguard.models.loading import load_clip
    from clipguard.outputs import write_record

    _figure_outputs(args, "--out")
    config = load_config(InversionConfig, args.config)
    config = override(config, seed=args.seed, device=args.device, **parse_assignments(InversionConfig, args.set))
    dataset = labelled_spec(args)
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    shots = draw_shots(args.shots, args.seed, dataset, clip.image_size)
    result = detect_backdoor(clip, shots, config)
    save_detection_figure(result, shots, args.out, clip=clip)
    write_record({"model": args.model, "shots": args.shots, "seed": args.seed, **result.as_dict()},
                 Path(args.out).with_suffix(".json"), "detection")
    print(f"{args.model}: {result.verdict()}; wrote {args.out}")
