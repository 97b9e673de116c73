"""Where clipguard writes: checks before any work, one run per output, staging, checksums.

Every command that writes checks its outputs first (:func:`check_output_directory`,
:func:`check_run_directory`, :func:`check_bench_directory`, :func:`check_output_file`), then
holds a lock on them for the whole run (:func:`claim_outputs`). The rules:

- clipguard never writes into the working directory, a folder above it, the home folder or ``/``;
- it replaces an existing directory only when that directory is a clipguard output (its
  ``config.json`` says so) holding nothing but files clipguard writes;
- a second run on the same output is refused and told which process holds it;
- a directory is published by renaming a staging directory (``.NAME.clipguard-staging-*``);
  staging left by a killed run is removed by the next run that holds the lock;
- ``config.json`` records each weights file's sha256; loading verifies it (:func:`verify_files`).

It sits below models, defenses and the bench, which all write through it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterable, Iterator

from clipguard import ClipguardError

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("clipguard.model", "clipguard.defense")  # config.json "format" of replaceable outputs
# Every name clipguard writes into a model or defense directory.
OUTPUT_FILES = frozenset({"config.json", "model.safetensors", "weights.safetensors", "trigger.safetensors",
                          "eval.json", "repair.json", "repair_examples.png"})
TRIGGER_FILE = "trigger.safetensors"  # a backdoored model's trigger tensors, beside its weights
STAGING_MARK = ".clipguard-staging-"
_OLD_STAGING = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".NAME.") of older versions
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


def _check_not_protected(path: Path, flag: str) -> None:
    reason = _protected(path)
    if reason:
        raise ClipguardError(f"{flag} {path} is {reason}; name a new directory for clipguard to write")
    if path.exists() and not path.is_dir():
        raise ClipguardError(f"{flag} {path} is an existing file; name a directory (clipguard writes one there)")
    _check_parent_folder(path, flag)


def check_output_directory(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a model or defense directory to write: new, empty, or a clipguard output to replace.

    Anything else (the working directory, a file, a folder of the user's files) is refused
    with a :class:`ClipguardError` before any work starts.
    """
    path = Path(path)
    _check_not_protected(path, flag)
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
    _check_parent_folder(path, flag)
    return path


def check_sidecar_json(path: Path, flag: str = "--out") -> Path:
    """A JSON clipguard writes beside a named output: refused if a file there is not clipguard's."""
    if path.is_dir():
        raise ClipguardError(f"{flag}: {path} (written beside it) is a directory; choose another name")
    if path.exists() and not isinstance(_read_json(path), dict):
        raise ClipguardError(f"{flag}: {path} (written beside it) exists and is not a clipguard record; "
                             "move it away or choose another name")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- locks
def lock_path(path: Path) -> Path:
    """The lock file of output ``path``: ``PARENT/.NAME.lock`` (beside it: a published directory is
    renamed into place, which a lock inside it would not survive)."""
    return path.parent / f".{path.name}.lock"


class _Lock:
    """An exclusive ``fcntl`` lock on ``lock_path(path)``, holding the owner's PID and command."""

    def __init__(self, path: Path):
        self.path, self.file = lock_path(Path(path)), None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ClipguardError(f"{self.path.parent / self.path.name[1:-5]} is in use by another clipguard run "
                                     f"({holder}); wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file as we opened it: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n".encode(), 0)
        self.file = fd

    def release(self) -> None:
        if self.file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.file)  # closing drops the lock
        self.file = None


@contextlib.contextmanager
def claim_outputs(*paths: str | Path) -> Iterator[None]:
    """Hold the locks of ``paths`` for the block, after removing staging left by killed runs.

    Under ``torchrun`` only rank 0 locks, and every process learns whether it could, so a refused
    run stops in all processes.
    """
    from clipguard.distributed import agree, is_main_process

    locks, message = [], ""
    if is_main_process():
        try:
            for path in paths:
                lock = _Lock(Path(path))
                lock.acquire()
                locks.append(lock)
                remove_stale_staging(Path(path))
        except ClipguardError as err:
            message = str(err)
    try:
        if not agree(not message):
            raise ClipguardError(message or "the output is in use by another clipguard run (see rank 0)")
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


# -------------------------------------------------------------------------- staging
def remove_stale_staging(path: Path) -> list[Path]:
    """Remove staging directories of ``path`` left by a run killed while saving (call under its lock)."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        ours = entry.name.startswith(f".{path.name}{STAGING_MARK}")
        old = _OLD_STAGING.match(entry.name)
        if not ours and old and old["name"] == path.name:  # older versions: only if it holds only our files
            ours = all(p.name in OUTPUT_FILES for p in entry.iterdir())
        if ours:  # clipguard's own staging: named by it, or holding nothing but its files
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.warning("removed %s, left by an interrupted save", entry)
    return removed


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
    if directory.exists():
        check_output_directory(directory, "output")  # again: it may have changed during the run
        shutil.rmtree(directory)
    os.replace(staging, directory)


def remove_run_directory(path: Path) -> None:
    """Remove a finished run's checkpoint files, then the folder if nothing else is in it."""
    for name in ("checkpoint.pt", "checkpoint.pt.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (Path(path) / name).unlink()
    with contextlib.suppress(OSError):  # missing, or it holds something clipguard did not write
        Path(path).rmdir()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(record: dict, path: str | Path) -> None:
    """Write ``record`` to ``path`` as JSON, atomically (temp name, then rename)."""
    atomic_write_text(Path(path), json.dumps(record, indent=2))


# -------------------------------------------------------------------------- checksums
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of files in ``directory`` (what config.json records under ``files``)."""
    return {name: sha256_file(directory / name) for name in names}


def verify_files(directory: Path, config: dict, verify: bool = True) -> None:
    """Check every file ``config["files"]`` lists against its recorded sha256.

    A mismatch means the file changed since clipguard wrote it (corruption or an edit) and is
    refused; ``verify=False`` (``--no-verify``) skips the check for deliberate edits.
    """
    files = config.get("files")
    if not verify:
        return
    if files is None:
        logger.warning("%s records no checksums (written by an older clipguard): not verified", directory)
        return
    if not isinstance(files, dict):
        raise ClipguardError(f"{directory / 'config.json'}: 'files' must map file names to sha256 digests")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ClipguardError(f"{path} is missing (config.json lists it); the directory is incomplete")
        if sha256_file(path) != expected:
            raise ClipguardError(f"{path} changed since clipguard wrote it (sha256 mismatch): the file is corrupt "
                                 "or was edited; re-create it, or pass --no-verify if you edited it on purpose")
