"""Classes travel by name: the one place a name becomes a position, local to one dataset's list,
and the one rule a user's class list follows (:func:`check_class_names`)."""

from __future__ import annotations

from typing import Sequence

from clipguard import ClipguardError


def class_index(classes: tuple[str, ...], name: str, where: str = "") -> int:
    """The position of class ``name`` in ``classes``; a ClipguardError naming them if it is not there."""
    if name not in classes:
        shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} classes)" if len(classes) > 12 else "")
        raise ClipguardError(f"target {name!r} is not a class{' of ' + where if where else ''}; its classes: {shown}")
    return classes.index(name)


def class_key(name: str) -> str:
    """A class name as a CLIP text encoder reads it: open_clip's tokenizer lowercases and collapses
    whitespace, and folder names read ``_`` as a space, so these do not tell two classes apart."""
    return " ".join(name.replace("_", " ").split()).casefold()


def check_class_names(names: Sequence[str], origins: Sequence[str], where: str) -> None:
    """The one class-list rule for users' names (folders, class-names files, CSV labels): no empty
    name, no two that read alike (:func:`class_key`). ``origins[i]`` says where name i came from
    ("line 3", "folder 'ankle_boot'"); ``where`` is the folder or file, for the message."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = class_key(name)
        if not key:
            raise ClipguardError(f"{where}: {origins[i]} is an empty class name; give every class a name")
        if key in seen:
            first = seen[key]
            alike = "" if names[first] == name else f" (as {name!r}: case, '_' and spaces do not tell classes apart)"
            raise ClipguardError(f"{where}: {origins[first]} and {origins[i]} both name class {names[first]!r}{alike}; "
                                 "give each class one distinct name (merge or rename one)")
        seen[key] = i
