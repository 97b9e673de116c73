"""One run per output: a lock held for the whole run, and the leftovers of a killed run removed.

:func:`claim_outputs` takes ``PARENT/.NAME.lock`` for each output (beside it: a published
directory is renamed into place); a second run on the same output is refused and told which
process holds it; a lock left by a killed run is taken over and removed. Under the lock, staging
directories a run killed while saving left (``.NAME.clipguard-staging-*``) are removed, and
folders the run created and left empty are removed when it ends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

from clipguard import ClipguardError

logger = logging.getLogger(__name__)

# Every name clipguard writes into a model or defense directory.
OUTPUT_FILES = frozenset({"config.json", "model.safetensors", "weights.safetensors", "trigger.safetensors",
                          "eval.json", "repair.json", "repair_examples.png"})
STAGING_MARK = ".clipguard-staging-"
_OLD_STAGING = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".NAME.") of older versions


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

        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # an ending run removed the empty folder it had made: make it again
                continue
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
        """Remove the lock file while still holding it, then drop the lock (a run that opened the
        file meanwhile finds it unlinked after locking it and locks a new one: see :meth:`acquire`)."""
        if self.file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.file)  # closing drops the lock
        self.file = None


def _new_folders(path: Path) -> list[Path]:
    """``path`` and the folders above it that do not exist yet, innermost first."""
    new = []
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        new.append(folder)
    return new


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that is an empty folder; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # missing, not empty, or not ours to remove
            if folder.exists():
                return


@contextlib.contextmanager
def claim_outputs(*paths: str | Path) -> Iterator[None]:
    """Hold the locks of ``paths`` for the block, after removing staging left by killed runs.

    Folders the run created (an output, its checkpoint folder, the folders above them) that are
    empty when it ends are removed, so a run that saved nothing leaves nothing behind; a folder that
    existed before is never removed. Under ``torchrun`` only rank 0 locks, and every process learns
    whether it could, so a refused run stops in all processes.
    """
    from clipguard.distributed import agree, is_main_process

    locks, message, new_folders = [], "", []
    if is_main_process():
        new_folders = [_new_folders(Path(path)) for path in paths]
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
        for folders in reversed(new_folders):
            _remove_if_empty(folders)


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
