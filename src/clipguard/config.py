"""Typed configs on disk: a YAML/JSON file is just the dataclass serialised."""

from __future__ import annotations

import dataclasses
import types
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
        else:
            value = checked_value(hint, value, f"{cls.__name__}.{key}")
        kwargs[key] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ClipguardError(str(err)) from None


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def checked_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` if it has type ``hint`` (an int passes as a float), else a ClipguardError naming ``where``.

    Knows the types configs use: bool, int, float, str, ``X | None``, ``list[X]``, ``tuple[X, ...]``, dict.

    >>> checked_value(float, 3, "Config.lr")
    3.0
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return checked_value(arg, value, where)
            except ClipguardError:
                continue
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = [a for a in args if a is not Ellipsis]
            if len(inner) == 1:
                value = [checked_value(inner[0], v, where) for v in value]
            return tuple(value) if origin is tuple else list(value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    else:
        return value  # a type configs do not use: not checked here
    raise ClipguardError(f"{where} must be {type_name(hint)}, got {value!r} ({type(value).__name__})")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def load_config(cls: type[T], path: str | Path | None, section: str | None = None) -> T:
    """``cls`` from a YAML/JSON file, or its defaults when ``path`` is None. With ``section``, a
    file whose ``section`` key holds a mapping (a bench recipe's ``attack:``) gives that mapping."""
    if path is None:
        return cls()
    path = Path(path)
    if not path.is_file():
        raise ClipguardError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ClipguardError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ClipguardError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    if section and isinstance(data.get(section), dict):
        data = data[section]
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
                if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(raw)
                values[name] = raw.lower() in ("1", "true", "yes", "on")
            elif kind in (int, float, str):
                values[name] = kind(raw)
            else:
                parsed = None if raw.strip().lower() in ("none", "null", "~") else yaml.safe_load(raw)
                values[name] = checked_value(kind, parsed, name)
        except (ValueError, yaml.YAMLError, ClipguardError):
            raise ClipguardError(f"--set {item!r}: {raw!r} is not a valid {type_name(kind)}") from None
    return values


def added_setting(default: Any, before: Any = dataclasses.MISSING) -> Any:
    """A config field added after results were cached: ``default``, and (metadata ``before``) the value
    that reproduces the behaviour from before the field existed (default: ``default``). A cache key
    leaves the field out while it holds that value (:func:`settings_added_later`), so adding an
    option keeps old cached models and cells valid::

        alpha_schedule: str = added_setting("constant")
    """
    return dataclasses.field(default=default, metadata={"before": default if before is dataclasses.MISSING else before})


def settings_added_later(cls: type) -> dict[str, Any]:
    """The top-level fields of dataclass ``cls`` added later, with their ``before`` values."""
    return {f.name: f.metadata["before"] for f in dataclasses.fields(cls) if "before" in f.metadata}
