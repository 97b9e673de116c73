"""Shared by the patch attacks: paste a (3, h, w) patch into images at a corner, centre or random spot."""

from __future__ import annotations

import torch


def paste_patch(images: torch.Tensor, patch: torch.Tensor, location: str, generator: torch.Generator | None = None,
                margin: int = 1) -> torch.Tensor:
    """Paste ``patch`` (3, h, w) into a copy of ``images`` (B, 3, H, W).

    location: 'corner' (bottom right, ``margin`` px in), 'center', or 'random' (per image,
    drawn from ``generator``).
    """
    out = images.clone()
    _, _, H, W = images.shape
    h, w = patch.shape[-2:]
    if location == "random":
        rows = torch.randint(0, H - h + 1, (len(images),), generator=generator)
        cols = torch.randint(0, W - w + 1, (len(images),), generator=generator)
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            out[i, :, r : r + h, c : c + w] = patch
        return out
    if location == "center":
        r, c = (H - h) // 2, (W - w) // 2
    elif location == "corner":
        r, c = H - h - margin, W - w - margin
    else:
        raise ValueError(f"location must be 'corner', 'center' or 'random', got {location!r}")
    out[:, :, r : r + h, c : c + w] = patch
    return out


def patch_mask(image_size: int, patch_size: int, location: str, margin: int = 1) -> torch.Tensor:
    """(H, W) bool mask of where a fixed-location patch lands (for IoU with located regions)."""
    mask = torch.zeros(image_size, image_size, dtype=torch.bool)
    if location == "center":
        r = c = (image_size - patch_size) // 2
    elif location == "corner":
        r = c = image_size - patch_size - margin
    else:
        raise ValueError("a random-location patch has no fixed mask")
    mask[r : r + patch_size, c : c + patch_size] = True
    return mask
