"""Integrity of what clipguard wrote: sha256 digests recorded in ``config.json`` and verified on load.

A model or defense directory's ``config.json`` lists each weights, trigger and tokenizer file with
its sha256 (:func:`file_digests`); :func:`verify_files` refuses a file that changed, a weights file
with no recorded digest, and any name that is not a plain file of that directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from clipguard import ClipguardError

TRIGGER_FILE = "trigger.safetensors"  # a backdoored model's trigger tensors, beside its weights


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of files in ``directory`` (what config.json records under ``files``)."""
    return {name: sha256_file(directory / name) for name in names}


WEIGHT_FILES = ("model.safetensors", "weights.safetensors", TRIGGER_FILE)  # must have a recorded sha256


def check_plain_name(directory: Path, name, where: str) -> None:
    """``name`` must be a plain file name in ``directory``: no separators, not '.' or '..', and not a
    symlink leading out of it (a suspect config.json must not make clipguard read or write elsewhere)."""
    plain = (isinstance(name, str) and name not in {"", ".", ".."} and "/" not in name and "\\" not in name
             and os.sep not in name and "\0" not in name)
    if plain and (directory / name).is_symlink():
        plain = (directory / name).resolve().parent == directory.resolve()
    if not plain:
        raise ClipguardError(f"{directory / 'config.json'}: {where} names {name!r}, which is not a plain file name in "
                             f"{directory}; a model directory only refers to its own files: the config is damaged "
                             "or hostile, do not use it")


def verify_files(directory: Path, config: dict, verify: bool = True, also: Iterable[str] = ()) -> None:
    """Check every file ``config["files"]`` lists against its recorded sha256.

    A mismatch means the file changed since clipguard wrote it (corruption or an edit) and is
    refused; so is a weights file (:data:`WEIGHT_FILES`, and the names in ``also``, e.g. tokenizer
    files) that exists with no recorded sha256, since deleting the entry would otherwise switch the
    check off. ``verify=False`` (``--no-verify``) skips both for deliberate edits and for directories
    of clipguard versions that recorded no checksums. Names in ``files`` must be plain file names
    (:func:`check_plain_name`), verified or not.
    """
    directory = Path(directory)
    files = config.get("files")
    if files is not None and not isinstance(files, dict):
        raise ClipguardError(f"{directory / 'config.json'}: 'files' must map file names to sha256 digests")
    for name in files or {}:
        check_plain_name(directory, name, "'files'")
    if not verify:
        return
    unrecorded = [name for name in dict.fromkeys([*WEIGHT_FILES, *also])
                  if name not in (files or {}) and (directory / name).is_file()]
    if unrecorded:
        why = "records no checksums at all" if files is None else f"records no checksum for {', '.join(unrecorded)}"
        raise ClipguardError(f"{directory / 'config.json'} {why}, so {unrecorded[0]} cannot be verified (an older "
                             "clipguard wrote it, or the entry was deleted); pass --no-verify to load it anyway if "
                             "you trust the directory")
    for name, expected in (files or {}).items():
        path = directory / name
        if not path.is_file():
            raise ClipguardError(f"{path} is missing (config.json lists it); the directory is incomplete")
        if sha256_file(path) != expected:
            raise ClipguardError(f"{path} changed since clipguard wrote it (sha256 mismatch): the file is corrupt "
                                 "or was edited; re-create it, or pass --no-verify if you edited it on purpose")
