"""Typed configs on disk: a YAML/JSON file is just the dataclass serialised."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clipguard import ClipguardError

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], base: T | None = None) -> T:
    """Build dataclass ``cls`` from a (nested) dict, refusing unknown keys by name.

    Fields the dict leaves out keep the defaults of ``base`` (or of ``cls``). A nested mapping
    overrides the parent's default for that field, so ``train: {batch_size: 64}`` in an
    AttackConfig keeps the attack's own epochs and lr rather than TrainConfig's.
    """
    if not isinstance(data, dict):
        raise ClipguardError(f"{cls.__name__} config must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ClipguardError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            inner = getattr(base, key) if base is not None else _field_default(fields[key])
            value = config_from_dict(hint, value, inner)
        kwargs[key] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ClipguardError(str(err)) from None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def load_config(cls: type[T], path: str | Path | None) -> T:
    """``cls`` from a YAML/JSON file, or its defaults when ``path`` is None."""
    if path is None:
        return cls()
    path = Path(path)
    if not path.is_file():
        raise ClipguardError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ClipguardError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return config_from_dict(cls, data)


def override(config: T, **values: Any) -> T:
    """A copy of ``config`` with the given fields replaced; ``None`` values are ignored.

    Dotted names reach nested dataclasses: ``override(recipe, **{"train.lr": 1e-3})``.
    """
    for name, value in values.items():
        if value is None:
            continue
        head, _, rest = name.partition(".")
        if rest:
            config = dataclasses.replace(config, **{head: override(getattr(config, head), **{rest: value})})
        else:
            if head not in {f.name for f in dataclasses.fields(config)}:
                raise ClipguardError(f"{type(config).__name__} has no setting {head!r}")
            try:
                config = dataclasses.replace(config, **{head: value})
            except ValueError as err:
                raise ClipguardError(str(err)) from None
    return config


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def parse_assignments(cls: type, assignments: list[str] | None) -> dict[str, Any]:
    """``["steps=100", "location=random"]`` -> typed values for dataclass ``cls``'s fields.

    Dotted names reach nested dataclasses (``train.epochs=1``) and keep their dotted key,
    which :func:`override` understands.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in assignments or []:
        name, sep, raw = item.partition("=")
        head, dot, rest = name.partition(".")
        if sep and dot and head in fields and dataclasses.is_dataclass(hints[head]):
            nested = parse_assignments(hints[head], [f"{rest}={raw}"])
            values.update({f"{head}.{key}": value for key, value in nested.items()})
            continue
        if not sep or name not in fields:
            raise ClipguardError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        kind = hints[name]
        try:
            if kind is bool:
                values[name] = raw.lower() in ("1", "true", "yes", "on")
            elif kind in (int, float, str):
                values[name] = kind(raw)
            else:
                values[name] = yaml.safe_load(raw)
        except ValueError:
            raise ClipguardError(f"--set {item!r}: {raw!r} is not a valid {kind.__name__}") from None
    return values
