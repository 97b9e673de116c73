"""Where clipguard writes: checks before any work, one run per output, staging, checksums.

Every command that writes checks its outputs first (:func:`check_output_directory`,
:func:`check_run_directory`, :func:`check_bench_directory`, :func:`check_output_file`), then
holds a lock on them for the whole run (:func:`clipguard.locks.claim_outputs`). The rules:

- clipguard never writes into the working directory, a folder above it, the home folder or ``/``,
  through a symbolic link, or into a read-only folder;
- an output is never an input (``--model``, a ``--defense``, a data spec's file or folder), a
  folder holding one, or inside an input folder (:func:`check_apart`, resolved paths);
- it replaces an existing directory only when that directory is a clipguard output of the same
  kind (its ``config.json`` "format") holding nothing but files clipguard writes, and a JSON
  file only when clipguard wrote it (:data:`RECORD_FORMATS`, :func:`is_clipguard_record`);
- a second run on the same output is refused and told which process holds it; the lock file
  is removed when the run ends (one left by a killed run is reused, then removed);
- a directory is published by renaming a staging directory (``.NAME.clipguard-staging-*``);
  staging left by a killed run is removed by the next run that holds the lock; folders a run
  created and left empty (it saved nothing) are removed when it ends;
- ``config.json`` records each weights file's sha256; loading verifies it (:mod:`clipguard.integrity`).

It sits below models, defenses and the bench, which all write through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from clipguard import ClipguardError
from clipguard.integrity import TRIGGER_FILE, sha256_file  # noqa: F401  (TRIGGER_FILE: named here too)
from clipguard.locks import OUTPUT_FILES, STAGING_MARK

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("clipguard.model", "clipguard.defense")  # config.json "format" of replaceable outputs
BENCH_MARKER = ".clipguard-bench.json"
# What a bench directory holds (older versions wrote no marker).
BENCH_NAMES = frozenset({"models", "defenses", "cells", "runs", "results.json", "results.md", "report.html",
                         BENCH_MARKER})


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be written as a whole, or None."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "the working directory or a folder above it"
    if resolved == Path.home().resolve():
        return "your home directory"
    if resolved == Path(resolved.anchor):
        return "the file-system root"
    return None


def _read_config(directory: Path) -> dict | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that clipguard would not have written there (sorted)."""
    config = _read_config(directory)
    if config is None or config.get("format") not in OUTPUT_FORMATS:
        return sorted(p.name for p in directory.iterdir())
    files = config.get("files")
    known = OUTPUT_FILES | (set(files) if isinstance(files, dict) else set())
    return sorted(p.name for p in directory.iterdir() if p.name not in known or not (p.is_file() or p.is_symlink()))


def _check_parent_folder(path: Path, flag: str) -> None:
    """The nearest existing folder above ``path`` must be a folder, not a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ClipguardError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def _check_not_a_link(path: Path, flag: str, what: str = "directory") -> None:
    """A symbolic link is refused: replacing it would write beside its target, not through it."""
    if path.is_symlink():
        raise ClipguardError(f"{flag} {path} is a symbolic link (to {os.readlink(path)}); name the {what} itself "
                             f"or a new {what}")


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing folder above ``path`` (where clipguard creates it, its lock and its
    staging) must be writable, and so must ``path`` itself if it is a folder clipguard would replace."""
    for folder in ([path] if path.is_dir() else []) + [p for p in path.parents if p.is_dir()][:1]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ClipguardError(f"{flag} {path}: {folder} is read-only (or not yours); choose a folder you can "
                                 "write to, or change its permissions")


def _refuse_protected(path: Path, flag: str) -> None:
    reason = _protected(path)
    if reason:
        raise ClipguardError(f"{flag} {path} is {reason}; name a new directory for clipguard to write")


def _check_not_protected(path: Path, flag: str) -> None:
    _refuse_protected(path, flag)
    _check_not_a_link(path, flag)
    if path.exists() and not path.is_dir():
        raise ClipguardError(f"{flag} {path} is an existing file; name a directory (clipguard writes one there)")
    _check_parent_folder(path, flag)
    _check_writable(path, flag)


def _kind(output_format: str) -> str:
    return {"clipguard.model": "a model directory", "clipguard.defense": "a defense directory"}[output_format]


def check_output_directory(path: str | Path, flag: str = "--out", kind: str | None = None) -> Path:
    """``path`` as a model or defense directory to write: new, empty, or a clipguard output to replace.

    Anything else (the working directory, a file, a symbolic link, a read-only folder, a folder
    of the user's files, and with ``kind`` (an :data:`OUTPUT_FORMATS` entry) an output of the
    other kind) is refused with a :class:`ClipguardError` before any work starts.
    """
    path = Path(path)
    _check_not_protected(path, flag)
    existing = (_read_config(path) or {}).get("format") if path.is_dir() else None
    if kind is not None and existing in OUTPUT_FORMATS and existing != kind:
        raise ClipguardError(f"{flag} {path} is {_kind(existing)}, and this run writes {_kind(kind)}: clipguard "
                             "replaces an output only with one of the same kind; choose another directory")
    if path.is_dir() and any(path.iterdir()):
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ClipguardError(f"{flag} {path} already holds files clipguard did not write ({shown}); "
                                 "choose a new directory, or move them away first")
    return path


def check_run_directory(path: str | Path, allowed: Iterable[str], flag: str = "--out") -> Path:
    """``path`` as a run directory (checkpoints) that holds at most the names in ``allowed``."""
    path = Path(path)
    _check_not_protected(path, flag)
    if path.is_dir():
        allowed = set(allowed) | {"checkpoint.pt", "checkpoint.pt.tmp"}
        foreign = sorted(p.name for p in path.iterdir() if p.name not in allowed)
        if foreign:
            raise ClipguardError(f"{flag} {path} already holds files clipguard did not write "
                                 f"({', '.join(foreign[:3])}); choose a new directory")
    return path


def check_bench_directory(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a bench results directory: new, empty, or one a bench wrote (it is the cache).

    A ``results.md`` that bench did not write (or that was edited since) is never overwritten.
    """
    path = Path(path)
    _check_not_protected(path, flag)
    if not path.is_dir() or not any(path.iterdir()):
        return path
    marker = _read_json(path / BENCH_MARKER)
    names = {p.name for p in path.iterdir()}
    older_bench = (path / "results.json").is_file() and all(n in BENCH_NAMES or n.endswith(".png") for n in names)
    if marker is None and not older_bench:
        foreign = sorted(names - BENCH_NAMES)[:3] or sorted(names)[:3]
        raise ClipguardError(f"{flag} {path} is not a clipguard bench directory (it holds {', '.join(foreign)}); "
                             "choose a new directory for the results")
    results = path / "results.md"
    if marker is not None and results.is_file() and sha256_file(results) != marker.get("results_md_sha256"):
        raise ClipguardError(f"{results} was not written by clipguard bench, or was edited since; move it away "
                             "or choose another --out (bench would overwrite it)")
    return path


def mark_bench_directory(path: Path, results_md: Path | None = None) -> None:
    """Write ``OUT/.clipguard-bench.json``: OUT is a bench directory, with the digest of its results.md."""
    record = {"format": "clipguard.bench"}
    if results_md is not None and results_md.is_file():
        record["results_md_sha256"] = sha256_file(results_md)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / BENCH_MARKER, json.dumps(record, indent=2))


def check_output_file(path: str | Path, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    """``path`` as a file to write: not a directory, one of ``suffixes``, in a folder (made if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ClipguardError(f"{flag} {path} is a directory; name a file ({' or '.join(suffixes)})")
    if path.suffix.lower() not in suffixes:
        raise ClipguardError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    _check_not_a_link(path, flag, "file")
    _check_parent_folder(path, flag)
    _check_writable(path, flag)
    return path


# A JSON record clipguard writes to a file the user names (--json, the .json beside a figure)
# starts with "format": one of these, and "clipguard_version".
RECORD_FORMATS = ("clipguard.evaluation", "clipguard.detection", "clipguard.resistivity")


def write_record(record: dict, path: str | Path, kind: str) -> None:
    """Write ``record`` to ``path`` marked as clipguard's ``kind`` of record (see :data:`RECORD_FORMATS`)."""
    import clipguard

    output_format = f"clipguard.{kind}"
    assert output_format in RECORD_FORMATS, kind
    write_json({"format": output_format, "clipguard_version": clipguard.__version__, **record}, path)


def is_clipguard_record(data) -> bool:
    """Whether ``data`` (a parsed JSON) is a record clipguard wrote: marked, or, from versions that
    did not mark them, an evaluation (``clean_accuracy`` with value/correct/total), a detection or
    a resistivity record with their exact keys."""
    if not isinstance(data, dict):
        return False
    if data.get("format") in RECORD_FORMATS:
        return True
    accuracy = data.get("clean_accuracy")
    return ((isinstance(accuracy, dict) and {"value", "correct", "total"} <= accuracy.keys())
            or {"model", "shots", "seed", "backdoored", "collapse", "mask_area"} <= data.keys()
            or {"model", "images", "seed", "resistivity"} <= data.keys())


def check_sidecar_json(path: Path, flag: str = "--out") -> Path:
    """A JSON record to write (``--json``, or beside a named figure): a new file or one clipguard wrote."""
    beside = "" if flag == "--json" else " (written beside it)"
    if path.is_dir():
        raise ClipguardError(f"{flag}: {path}{beside} is a directory; choose another name")
    _check_not_a_link(path, flag, "file")
    if path.exists() and not is_clipguard_record(_read_json(path)):
        raise ClipguardError(f"{flag}: {path}{beside} exists and clipguard did not write it; move it away or "
                             "choose another name")
    return path


def spec_paths(spec) -> list[Path]:
    """The existing files and folders an input spec names, cheaply: the spec itself, or what follows
    its first ':' (``csv:FILE``, ``imagenet:DIR``, ``ViT-B-32:/path/weights``), each of its
    ``::``-joined parts, a brace pattern's folder (``wds:/data/{000..009}.tar`` -> ``/data``)."""
    text = str(spec or "")
    found = []
    for candidate in {text, text.split(":", 1)[-1]}:
        for part in candidate.split("::"):
            if "{" in part:
                part = os.path.dirname(part.split("{", 1)[0])
            if part and Path(part).exists():
                found.append(Path(part))
    return found


def check_apart(outputs: dict[str, str | Path], inputs: dict[str, object]) -> None:
    """No output is an input, holds one, or (for a folder input) lies inside one.

    ``outputs``: ``{flag: path}``; ``inputs``: ``{flag: spec or list of specs}`` (specs as
    :func:`spec_paths` reads them). Paths are compared resolved (symbolic links followed).
    """
    for out_flag, out in outputs.items():  # the working directory and the like: that message first
        _refuse_protected(Path(out), out_flag)
    for in_flag, specs in inputs.items():
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            for source in spec_paths(spec):
                where = source.resolve()
                for out_flag, out in outputs.items():
                    target = Path(out).resolve()
                    if target == where:
                        why = f"is the {in_flag} {source}"
                    elif where.is_relative_to(target):
                        why = f"holds the {in_flag} {source}"
                    elif where.is_dir() and target.is_relative_to(where):
                        why = f"is inside the {in_flag} {source}"
                    else:
                        continue
                    raise ClipguardError(f"{out_flag} {out} {why}: clipguard never writes over or into what it "
                                         f"reads; choose another {out_flag}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------------- staging
@contextlib.contextmanager
def staged_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside ``directory``; on success it replaces ``directory`` (which
    must be absent, empty or a clipguard output), on any error it is removed."""
    import tempfile

    directory = Path(directory)
    check_output_directory(directory, "output")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{STAGING_MARK}", dir=directory.parent))
    try:
        yield staging
        _publish(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the staging directory made above
        raise


def _publish(staging: Path, directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.iterdir():
        os.chmod(path, 0o666 & ~umask)
    if directory.exists():  # again (it may have changed during the run), now knowing the kind written
        check_output_directory(directory, "output", kind=(_read_config(staging) or {}).get("format"))
        shutil.rmtree(directory)
    os.replace(staging, directory)


def remove_run_directory(path: Path) -> None:
    """Remove a finished run's checkpoint files, then the folder if nothing else is in it."""
    for name in ("checkpoint.pt", "checkpoint.pt.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (Path(path) / name).unlink()
    with contextlib.suppress(OSError):  # missing, or it holds something clipguard did not write
        Path(path).rmdir()


def atomic_write(path: str | Path, write: Callable[[Path], object], temporary: str | None = None) -> None:
    """Make ``path`` (and its folder) by ``write(tmp)`` on a temporary file beside it, then a rename.
    ``temporary``: that file's name (default ``.NAME.tmp``; a writer that reads the format from
    the suffix needs it kept at the end)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary or f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary file is left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(record: dict, path: str | Path) -> None:
    """Write ``record`` to ``path`` as JSON, atomically (temp name, then rename)."""
    atomic_write_text(Path(path), json.dumps(record, indent=2))
