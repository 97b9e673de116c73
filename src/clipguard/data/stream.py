"""Batches of a streamed image set, decoded in DataLoader worker processes.

A :class:`~clipguard.data.folders.FolderImages` (or a caption corpus) holds file names only;
:func:`iterate_batches` decodes the asked batches in ``workers`` processes, a couple of batches
ahead, so memory holds a few batches whatever the dataset's size. An in-memory set
(:class:`~clipguard.data.fmnist.ImageSet`) is sliced directly.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset


def default_workers() -> int:
    """DataLoader worker processes by default: the core count, at most 8."""
    return min(8, os.cpu_count() or 1)


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
    for batch in loader:
        yield batch.float().div_(255)
