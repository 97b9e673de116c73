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
    # the built-in data is 28 px whatever the size asked; a user's is decoded at the model's
    train, test = load_dataset(dataset, "train", clip.image_size), load_dataset(dataset, "test", clip.image_size)
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


def detect_settings(items: list[str] | None, base: dict | None = None) -> tuple[dict[str, dict], list[str]]:
    """``--set`` of detect: ``DETECTOR.FIELD=V`` (a registered detector's config), ``verdict.FIELD=V``
    (VerdictConfig, dotted for ``verdict.targeted.steps``) or a bare ``FIELD=V`` (the patch detector's
    inversion, as before). Returns (detector name -> field values, the verdict's items)."""
    from clipguard import ClipguardError
    from clipguard.config import parse_assignments
    from clipguard.detection import DETECTORS

    per_detector, verdict = {}, []
    for item in items or []:
        head, dot, rest = item.partition("=")[0].partition(".")
        if dot and head == "verdict":
            verdict.append(item.partition(".")[2])
        elif dot and head in DETECTORS:
            per_detector.setdefault(head, []).append(item.partition(".")[2])
        elif dot and "-" in head:
            raise ClipguardError(f"--set {item!r}: {head!r} is not a detector ({', '.join(sorted(DETECTORS))}) "
                                 "nor 'verdict'")
        else:
            per_detector.setdefault("patch", []).append(item)
    settings = {name: parse_assignments(DETECTORS[name].config_class, values) for name, values in per_detector.items()}
    if base:
        settings["patch"] = {**base, **settings.get("patch", {})}
    return settings, verdict


def cmd_detect(args) -> None:
    import dataclasses

    from clipguard.config import load_config, override, parse_assignments
    from clipguard.detection import DETECTORS
    from clipguard.detection.inversion import InversionConfig
    from clipguard.detection.report import save_report_figure
    from clipguard.detection.verdict import VerdictConfig, scan
    from clipguard.pipeline import draw_shots
    from clipguard.models.loading import load_clip
    from clipguard.outputs import write_record

    _figure_outputs(args, "--out")
    base = None
    if args.config:  # the patch inversion's file; --seed and --device stay the flags'
        base = {k: v for k, v in dataclasses.asdict(load_config(InversionConfig, args.config)).items()
                if k not in ("seed", "device")}
    for name in args.detectors or []:
        DETECTORS.get_class(name)  # an unknown name: refused before any model is loaded
    settings, verdict_items = detect_settings(args.set, base)
    verdict_config = override(VerdictConfig(), **parse_assignments(VerdictConfig, verdict_items))
    dataset = labelled_spec(args)
    clip = load_clip(args.model, device=args.device, verify=verify(args))
    reference = load_clip(args.reference, device=args.device, verify=verify(args)) if args.reference else None
    shots = draw_shots(args.shots, args.seed, dataset, clip.image_size)
    report = scan(clip, shots, args.detectors, reference, verdict_config, settings, seed=args.seed,
                  device=args.device, reference_name=args.reference or "model")
    save_report_figure(report, clip, shots, args.out)
    write_record({"model": args.model, "reference": args.reference, "shots": args.shots, "seed": args.seed,
                  "dataset": str(dataset), "classes": len(shots.classes), **report.as_dict()},
                 Path(args.out).with_suffix(".json"), "detection")
    print(report.line())
    for line in report.detector_lines():
        print(f"  {line}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')} ({report.seconds:.0f} s)")
