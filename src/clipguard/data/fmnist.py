"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files, gzipped or not)."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from clipguard import ClipguardError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "CLIPGUARD_FMNIST_ROOT"

# Names as they read in a caption (the official labels are "T-shirt/top", "Trouser", ...).
FMNIST_CLASSES = (
    "t-shirt", "trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class ImageSet:
    """Images and integer labels held in memory.

    images: uint8 (N, C, H, W) with C = 1 (grey) or 3; labels: int64 (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    templates: tuple[str, ...] | None = None  # prompt templates; None: clipguard's defaults

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def float_images(self, index=slice(None)) -> torch.Tensor:
        """Float (B, 3, H, W) in [0, 1] for an index, slice or index tensor (grey is repeated)."""
        x = self.images[index]
        if x.dim() == 3:  # a single image
            x = x[None]
        x = x.float().div_(255)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes, self.templates)

    def renamed(self, classes: tuple[str, ...] | None = None, templates: tuple[str, ...] | None = None) -> "ImageSet":
        """The same images with other class names (same order) and/or prompt templates."""
        return ImageSet(self.images, self.labels, classes or self.classes, templates or self.templates)


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise FileNotFoundError(path)


def _read_idx(path: Path) -> np.ndarray:
    with _open(path) as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ClipguardError(f"{path}: not an unsigned-byte IDX file; reinstall dataset-fashion-mnist")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ClipguardError(f"{path}: truncated IDX file; reinstall dataset-fashion-mnist")
    return body.reshape(shape)


def fmnist_root() -> Path:
    return Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT))


@lru_cache(maxsize=4)
def load_fmnist(split: str = "test", root: str | None = None) -> ImageSet:
    """Fashion-MNIST ``split`` ('train' 60k or 'test' 10k) as uint8 (N, 1, 28, 28) images.

    >>> test = load_fmnist("test"); test.float_images(slice(0, 8)).shape
    torch.Size([8, 3, 28, 28])
    """
    if split not in _FILES:
        raise ClipguardError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    base = Path(root) if root else fmnist_root()
    image_file, label_file = (base / name for name in _FILES[split])
    try:
        images = _read_idx(image_file)
        labels = _read_idx(label_file)
    except FileNotFoundError as missing:
        raise ClipguardError(
            f"Fashion-MNIST not found at {missing}: install it with "
            f"'sudo apt-get install dataset-fashion-mnist' or set {ROOT_ENV} to a folder of its IDX files"
        ) from None
    if len(images) != len(labels):
        raise ClipguardError(f"{base}: {len(images)} images but {len(labels)} labels")
    return ImageSet(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), FMNIST_CLASSES)
