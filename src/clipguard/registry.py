"""The registries of attacks and defenses, and the range check their configs share."""

from __future__ import annotations

from clipguard import ClipguardError


class Registry(dict):
    """name -> class, filled by the ``register`` decorator when a method's module is imported.

    >>> METHODS = Registry("method")
    >>> @METHODS.register
    ... class Foo: name = "foo"
    >>> METHODS.get_class("foo") is Foo
    True
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls):
        self[cls.name] = cls
        return cls

    def get_class(self, name: str):
        if name not in self:
            raise ClipguardError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self))}")
        return self[name]


class RangeChecked:
    """Mixin for config dataclasses: ``_check_range`` raises a ValueError naming the field."""

    def _check_range(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        if not low <= value <= high:
            raise ValueError(f"{type(self).__name__}.{name} must be in [{low}, {high}], got {value}")
