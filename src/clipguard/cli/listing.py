"""``clipguard list``: what can be loaded and run, and the ``--set`` fields of any method."""

from __future__ import annotations

from clipguard import ClipguardError


def cmd_list(args) -> None:
    import open_clip

    if args.settings:
        return _print_settings(args.settings)

    print("models:   builtin (default), builtin-broad, NAME:TAG, hf-hub:ORG/REPO, a model directory, a state-dict file")
    print("datasets: fmnist, fmnist-val (shots from train[:55000], evaluation on train[55000:]), "
          "DIR (an ImageFolder; train/ + val/ or test/ are splits), imagenet:DIR (synset folders, "
          "OpenAI's class names and templates), csv:FILE (filepath,label); --classnames/--templates FILE override")
    print("captions: fmnist, fmnist-web (web-style renderings; fmnist-web:plain=P leaves a share P plain), "
          "csv:FILE (filepath,caption; --csv-separator/--csv-img-key/--csv-caption-key), "
          "wds:SHARDS (webdataset tars of jpg + txt, {000..099} expanded)")
    print("pools:    any dataset or captions spec, labels ignored; fmnist-train:N, fmnist-test:N")
    from clipguard.attacks import ATTACKS

    print("attacks:  " + ", ".join(sorted(ATTACKS)))
    from clipguard.detection import DETECTORS

    print("detectors: " + ", ".join(sorted(DETECTORS)) + " (detect runs every one the data allows; "
          "'clipguard list --settings detect' lists their settings)")
    from clipguard.defenses import DEFENSES
    from clipguard.pipeline import defended_methods

    learns = {"shots": "clean labelled shots", "pool": "an unlabelled --pool", "pairs": "clean image-caption pairs"}
    print("defenses:")
    for name in defended_methods()[1:]:
        cls = DEFENSES[name]
        writes = "rewrites the weights (writes a model directory)" if cls.rewrites_weights else "a defense directory"
        print(f"  {name:<14} learns from {learns[cls.data]}; {writes}")
    if args.open_clip:
        for name, tag in open_clip.list_pretrained():
            print(f"  {name}:{tag}")


def _print_settings(name: str) -> None:
    """Every field of a config dataclass with its default and its comment, as --set takes them.
    ``detect``: every detector's fields (``DETECTOR.FIELD``) and the verdict's (``verdict.FIELD``)."""
    from clipguard.attacks import ATTACKS, AttackConfig
    from clipguard.defenses import DEFENSES
    from clipguard.detection import DETECTORS
    from clipguard.detection.verdict import VerdictConfig

    if name == "detect":
        print("detect: --set DETECTOR.FIELD=VALUE (a bare FIELD=VALUE is the patch detector's), --set verdict.FIELD=VALUE")
        for detector in sorted(DETECTORS):
            _print_fields(DETECTORS[detector].config_class, f"{detector}.")
        _print_fields(VerdictConfig, "verdict.")
        return
    if name in ATTACKS:
        cls = ATTACKS[name].config_class
    elif name in DEFENSES:
        cls = DEFENSES[name].config_class
    elif name in DETECTORS:
        cls = DETECTORS[name].config_class
        name = f"{name} (detect --set {name}.FIELD=VALUE)"
    elif name == "attack":
        cls = AttackConfig
    else:
        raise ClipguardError(f"--settings {name!r}: not an attack, a defense, a detector, 'attack' or 'detect'; "
                             "see 'clipguard list'")
    print(f"{name} ({cls.__name__}): --set FIELD=VALUE")
    _print_fields(cls)


def _comments(cls) -> dict[str, str]:
    """Field name -> the comment after its definition, over the class and its bases (a subclass's wins)."""
    import inspect

    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            head, _, comment = line.partition("  # ")
            field_name = head.strip().split(":")[0]
            if comment and field_name.isidentifier():
                comments[field_name] = comment.strip()
    return comments


def _print_fields(cls, prefix: str = "") -> None:
    """One line per field of the dataclass ``cls``: prefix + name = default  # comment; a nested
    config dataclass (the verdict's ``targeted``) is listed field by field under its own prefix."""
    import dataclasses

    comments = _comments(cls)
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            _print_fields(type(default), f"{prefix}{field.name}.")
            continue
        print(f"  {prefix}{field.name} = {default!r}" + (f"  # {comments[field.name]}" if field.name in comments else ""))
