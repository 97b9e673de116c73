"""Contrastive losses as pure functions of features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021).

    image_features, text_features: (B, D), L2-normalised, row i of each a pair.
    caption_ids: (B,) int64, equal for identical captions. When given, identical captions are
    all positives of each other (the target spreads evenly over them): with class-name captions
    a batch holds many identical texts, and calling them negatives would push apart pairs
    that mean the same thing.

    >>> f = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    >>> clip_contrastive_loss(f, f, 100.0) < 1e-3
    tensor(True)
    """
    logits = logit_scale * image_features @ text_features.T  # (B, B)
    if caption_ids is None:
        targets = torch.eye(len(logits), device=logits.device)
    else:
        same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)  # (B, B)
        targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))
