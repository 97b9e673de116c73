"""Users' own data: an ImageFolder-style tree (one sub-folder per class) or a CSV of (filepath, caption)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image(path: Path, size: int) -> torch.Tensor:
    """uint8 (3, size, size): RGB, resized (shorter side) and centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except FileNotFoundError:
        raise ClipguardError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ClipguardError(f"cannot read image {path} ({err}); remove or replace the file") from None


def load_image_folder(root: str | Path, size: int) -> ImageSet:
    """An ImageFolder tree ``root/<class name>/<image>``; classes in sorted folder order."""
    root = Path(root)
    if not root.is_dir():
        raise ClipguardError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ClipguardError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(read_image(path, size))
                labels.append(label)
    if not images:
        raise ClipguardError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    class_names = tuple(name.replace("_", " ") for name in classes)
    return ImageSet(torch.stack(images), torch.tensor(labels), class_names)


def load_caption_csv(path: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images uint8 (N, 3, size, size) and captions from a CSV with columns ``filepath,caption``.

    Relative file paths are resolved against the CSV's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipguardError(f"caption CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filepath", "caption"} <= set(reader.fieldnames):
            raise ClipguardError(f"{path}: needs a header with columns 'filepath' and 'caption', got {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise ClipguardError(f"{path}: no rows")
    images = [read_image((path.parent / row["filepath"]), size) for row in rows]
    return torch.stack(images), [row["caption"] for row in rows]
