"""Shared by the patch attacks: paste a (3, h, w) patch into images at a corner, the four corners
(and the vertical midline), the centre or a random spot."""

from __future__ import annotations

import torch

LOCATIONS = ("corner", "corners", "corners+midline", "center", "random")


def paste_patch(images: torch.Tensor, patch: torch.Tensor, location: str, generator: torch.Generator | None = None,
                margin: int = 1) -> torch.Tensor:
    """Paste ``patch`` (3, h, w) into a copy of ``images`` (B, 3, H, W).

    location: 'corner' (bottom right, ``margin`` px in), 'corners' (all four, ``margin`` px in:
    Turner et al.'s four-corner trigger), 'corners+midline' (the four corners and three copies down
    the vertical midline: top, centre, bottom), 'center', or 'random' (per image, drawn from
    ``generator``).
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
    for r, c in _spots(H, W, h, w, location, margin):
        out[:, :, r : r + h, c : c + w] = patch
    return out


def _spots(H: int, W: int, h: int, w: int, location: str, margin: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of each fixed-location copy of an (h, w) patch in an (H, W) image."""
    if location == "center":
        return [((H - h) // 2, (W - w) // 2)]
    if location == "corner":
        return [(H - h - margin, W - w - margin)]
    corners = [(r, c) for r in (margin, H - h - margin) for c in (margin, W - w - margin)]
    if location == "corners":
        return corners
    if location == "corners+midline":
        return corners + [(r, (W - w) // 2) for r in (margin, (H - h) // 2, H - h - margin)]
    raise ValueError(f"location must be one of {', '.join(LOCATIONS)}, got {location!r}")


def patch_mask(image_size: int, patch_size: int, location: str, margin: int = 1) -> torch.Tensor:
    """(H, W) bool mask of where a fixed-location patch lands (for IoU with located regions)."""
    if location == "random":
        raise ValueError("a random-location patch has no fixed mask")
    mask = torch.zeros(image_size, image_size, dtype=torch.bool)
    for r, c in _spots(image_size, image_size, patch_size, patch_size, location, margin):
        mask[r : r + patch_size, c : c + patch_size] = True
    return mask
