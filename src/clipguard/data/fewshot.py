"""Seeded few-shot sampling: k labelled images per class."""

from __future__ import annotations

import torch

from clipguard import ClipguardError


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices of ``shots`` images per class, drawn without replacement under ``seed``.

    labels: (N,) int64. Returns (num_classes * shots,) int64, grouped by class, sorted within class.

    >>> few_shot_indices(torch.tensor([0, 1, 0, 1, 0]), shots=2, seed=0).numel()
    4
    """
    if shots < 1:
        raise ClipguardError(f"shots must be >= 1, got {shots}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < shots:
            raise ClipguardError(f"class {c} has {len(pool)} images, fewer than --shots {shots}")
        pick = pool[torch.randperm(len(pool), generator=generator)[:shots]]
        chosen.append(pick.sort().values)
    return torch.cat(chosen)
