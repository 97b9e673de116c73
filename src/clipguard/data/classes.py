"""Classes travel by name: the one place a name becomes a position, local to one dataset's list."""

from __future__ import annotations

from clipguard import ClipguardError


def class_index(classes: tuple[str, ...], name: str, where: str = "") -> int:
    """The position of class ``name`` in ``classes``; a ClipguardError naming them if it is not there."""
    if name not in classes:
        shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} classes)" if len(classes) > 12 else "")
        raise ClipguardError(f"target {name!r} is not a class{' of ' + where if where else ''}; its classes: {shown}")
    return classes.index(name)
