"""Batches of a streamed image set, decoded in DataLoader worker processes.

A :class:`~clipguard.data.folders.FolderImages` (or a caption corpus) holds file names only;
:func:`iterate_batches` decodes the asked batches in ``workers`` processes, a couple of batches
ahead, so memory holds a few batches whatever the dataset's size. An in-memory set
(:class:`~clipguard.data.fmnist.ImageSet`) is sliced directly. An unreadable image raises the
same one-line ClipguardError with workers as without (:func:`one_line_errors`).
"""

from __future__ import annotations

import os
import traceback
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clipguard import ClipguardError


def default_workers() -> int:
    """DataLoader worker processes by default: the core count, at most 8."""
    return min(8, os.cpu_count() or 1)


def worker_message(err: ClipguardError) -> str | None:
    """The message a DataLoader worker raised ``err`` with; None if it was raised in this process.

    torch re-raises a worker's exception as ``type(err)(text)``, the text being "Caught
    ClipguardError in DataLoader worker process 0.\\nOriginal Traceback ..." ending with the
    traceback's last line, ``clipguard.ClipguardError: MESSAGE``."""
    text = str(err)
    if not (text.startswith("Caught ") and "DataLoader worker process" in text.partition("\n")[0]):
        return None
    kind = type(err)
    before, found, message = text.rpartition(f"\n{kind.__module__}.{kind.__qualname__}: ")
    return message.rstrip("\n") if found else None


def one_line_errors(batches: Iterable) -> Iterator:
    """The items of ``batches`` (a DataLoader), a ClipguardError raised in a worker process
    re-raised here with its own message, as it reads with ``num_workers=0``."""
    try:
        yield from batches
    except ClipguardError as err:
        message = worker_message(err)
        if message is None:
            raise
        # torch's re-raise leaves a reference cycle through its frames that holds the loader's
        # iterator until a garbage collection, which then waits 5 s for the workers: clear it now
        traceback.clear_frames(err.__traceback__)
        raise type(err)(message) from None


class _Decoded(Dataset):
    """Item ``i`` of a streamed set as uint8 (3, S, S), decoded in the worker that asks."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images.decode(index)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def iterate_batches(images, batches: Sequence[torch.Tensor], workers: int | None = None) -> Iterator[torch.Tensor]:
    """Float (B, 3, S, S) in [0, 1] for each index tensor in ``batches``, in order.

    A streamed set (``streamed`` True: it lists files and ``decode(i)`` reads one) is decoded by
    ``workers`` DataLoader processes (0: in this process); an in-memory one is sliced."""
    if not getattr(images, "streamed", False):
        for batch in batches:
            yield images.float_images(batch)
        return
    workers = images.workers if workers is None else workers
    workers = min(workers, len(batches))
    loader = DataLoader(_Decoded(images), batch_sampler=[b.tolist() for b in batches], num_workers=workers,
                        collate_fn=_stack, prefetch_factor=2 if workers else None)
    for batch in one_line_errors(loader):
        yield batch.float().div_(255)
