"""Image-caption corpora (``--captions``): the attacker's poisoning corpus and the defender's clean pairs.

Three kinds, one interface (``len``, ``decode(i)`` a uint8 image, ``caption(i, seed, epoch)``,
``mentions(name)``, ``subset``):

- :class:`LabelledCorpus`: a labelled image set (the built-in Fashion-MNIST) whose captions are
  drawn afresh each epoch from the class name and the image (:func:`training_caption`);
- :class:`FileCorpus`: a CSV of image paths and captions, open_clip / CleanCLIP style;
- :class:`TarCorpus`: webdataset tar shards of ``KEY.jpg`` + ``KEY.txt``.

No image is held: each is decoded when a batch asks for it (in DataLoader workers during a
fit). Captions are held, as open_clip's CSV reader holds them (a few tens of MB at CC3M size).
"""

from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from clipguard import ClipguardError
from clipguard.data.captions import training_caption
from clipguard.data.folders import IMAGE_SUFFIXES, read_csv_rows, read_image, resize_crop
from clipguard.data.stream import default_workers

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset sample members read as the image


def mentions(captions: Sequence[str], name: str) -> torch.Tensor:
    """Bool (N,): which captions name ``name`` as whole words, case-insensitive."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name.lower())}(?![\w-])")
    return torch.tensor([bool(pattern.search(c.lower())) for c in captions], dtype=torch.bool)


class _Corpus:
    """Shared pieces: ``size`` (image side), ``workers`` (DataLoader processes), ``float_images``."""

    size: int
    workers: int
    labels: torch.Tensor | None = None  # (N,) positions in ``classes``, for a labelled corpus
    classes: tuple[str, ...] | None = None

    @property
    def image_size(self) -> int:
        return self.size

    def float_images(self, index) -> torch.Tensor:
        """Float (B, 3, S, S) in [0, 1] for an index tensor (decoded now, in this process)."""
        items = torch.as_tensor(index).reshape(-1).tolist()
        if not items:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack([self.decode(i) for i in items]).float().div_(255)

    def decode(self, index: int) -> torch.Tensor:
        raise NotImplementedError


class LabelledCorpus(_Corpus):
    """A labelled image set as caption pairs: each epoch gives item ``i`` a fresh caption of its
    class under (seed, epoch, i). images: an :class:`ImageSet` or a :class:`FolderImages`."""

    def __init__(self, images):
        self.images, self.labels, self.classes = images, images.labels, images.classes
        self.size, self.workers = images.image_size, getattr(images, "workers", 0)
        self.streamed = getattr(images, "streamed", False)  # an in-memory set is sliced, not decoded

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, index: int) -> torch.Tensor:  # only for a streamed set (an in-memory one is sliced)
        return self.images.decode(index)

    def float_images(self, index) -> torch.Tensor:
        return self.images.float_images(index)

    def caption(self, index: int, seed: int, epoch: int, image: torch.Tensor) -> str:
        rng = random.Random(hash((seed, epoch, index)))  # int tuples hash alike in every process
        return training_caption(self.classes[int(self.labels[index])], image, rng)

    def mentions(self, name: str) -> torch.Tensor:
        return self.labels == self.classes.index(name) if name in self.classes else torch.zeros(len(self), dtype=bool)

    def subset(self, index: torch.Tensor) -> "LabelledCorpus":
        return LabelledCorpus(self.images.subset(index))


class _CaptionList(_Corpus):
    """A corpus whose captions are given (``self.captions``, one per pair), not drawn."""

    captions: tuple[str, ...]
    streamed = True  # files or shard members, decoded on demand

    def caption(self, index: int, seed: int = 0, epoch: int = 0, image=None) -> str:
        return self.captions[index]

    def mentions(self, name: str) -> torch.Tensor:
        return mentions(self.captions, name)


class FileCorpus(_CaptionList):
    """Pairs listed in a CSV: image paths (relative ones against the CSV's folder) and captions."""

    def __init__(self, files: Sequence[Path], captions: Sequence[str], size: int, workers: int | None = None,
                 source: str = ""):
        self.files, self.captions, self.size = tuple(files), tuple(captions), size
        self.workers = default_workers() if workers is None else workers
        self.source = source

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> torch.Tensor:
        return read_image(self.files[index], self.size)

    def subset(self, index: torch.Tensor) -> "FileCorpus":
        keep = torch.as_tensor(index).tolist()
        return FileCorpus([self.files[i] for i in keep], [self.captions[i] for i in keep], self.size, self.workers,
                          self.source)


class TarCorpus(_CaptionList):
    """webdataset shards read by offset: ``entries[i]`` = (shard, offset, size) of pair i's image.

    Samples group a tar's members by key as webdataset does (``dir/KEY.ext``); a sample is a pair
    when it has an image member (jpg, jpeg, png, webp) and a ``txt``."""

    def __init__(self, entries: Sequence[tuple[str, int, int]], captions: Sequence[str], size: int,
                 workers: int | None = None, keys: Sequence[str] = ()):
        self.entries, self.captions, self.size = tuple(entries), tuple(captions), size
        self.keys = tuple(keys) or tuple(f"{s}:{o}" for s, o, _ in self.entries)
        self.workers = default_workers() if workers is None else workers

    def __len__(self) -> int:
        return len(self.entries)

    def decode(self, index: int) -> torch.Tensor:
        shard, offset, size = self.entries[index]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return resize_crop(im, self.size)
        except (UnidentifiedImageError, OSError) as err:
            raise ClipguardError(f"cannot read image {self.keys[index]} in {shard} ({err}); "
                                 "remove or replace that sample") from None

    def subset(self, index: torch.Tensor) -> "TarCorpus":
        keep = torch.as_tensor(index).tolist()
        return TarCorpus([self.entries[i] for i in keep], [self.captions[i] for i in keep], self.size, self.workers,
                         [self.keys[i] for i in keep])


def load_caption_csv(path: str | Path, size: int, separator: str = ",", img_key: str = "filepath",
                     caption_key: str = "caption", workers: int | None = None) -> FileCorpus:
    """A CSV of pairs with columns ``img_key`` and ``caption_key`` (open_clip's ``--csv-img-key``,
    ``--csv-caption-key``, ``--csv-separator``). Every listed image must exist (checked now)."""
    path = Path(path)
    rows = read_csv_rows(path, (img_key, caption_key), "caption", separator)
    files = [path.parent / row[img_key] for row in rows]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise ClipguardError(f"{path}: image not found: {missing}")
    return FileCorpus(files, [row[caption_key] for row in rows], size, workers, str(path))


def expand_shards(spec: str) -> list[Path]:
    """Local tar shards from a spec like open_clip's ``--train-data``: braces expanded and ``::``
    separated lists, by webdataset's own ``expand_urls``. Every shard must exist."""
    from webdataset.shardlists import expand_urls

    shards = [Path(url) for url in expand_urls(spec)]
    remote = next((s for s in map(str, shards) if re.match(r"^[a-z0-9]+:", s)), None)
    if remote:
        raise ClipguardError(f"wds:{spec}: {remote} is not a local file; copy the shards to a local disk first")
    missing = next((s for s in shards if not s.is_file()), None)
    if missing is not None:
        raise ClipguardError(f"webdataset shard not found: {missing}")
    return shards


def index_shards(shards: Sequence[Path]) -> tuple[list[tuple[str, int, int]], list[str], list[str]]:
    """(image entries, captions, keys) of every image + txt sample in ``shards``, in shard order.

    One pass over the tar headers; the small ``txt`` members are read, the images are not."""
    from webdataset.tariterators import base_plus_ext

    entries, captions, keys = [], [], []
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    sample = samples.setdefault(key, {})
                    ext = ext.lower()
                    if ext == "txt":
                        sample["txt"] = tar.extractfile(member).read().decode("utf-8").strip()
                    elif ext in IMAGE_EXTENSIONS and "image" not in sample:
                        sample["image"] = (str(shard), member.offset_data, member.size)
        except (tarfile.TarError, OSError) as err:
            raise ClipguardError(f"cannot read webdataset shard {shard} ({err}); replace or remove it") from None
        for key, sample in samples.items():
            if "image" in sample and "txt" in sample:
                entries.append(sample["image"])
                captions.append(sample["txt"])
                keys.append(key)
    return entries, captions, keys


def load_webdataset(spec: str, size: int, workers: int | None = None) -> TarCorpus:
    """The image + caption pairs of the webdataset shards ``spec`` (e.g. ``data/{00000..00099}.tar``)."""
    shards = expand_shards(spec)
    entries, captions, keys = index_shards(shards)
    if not entries:
        raise ClipguardError(f"wds:{spec}: no sample with an image ({', '.join(IMAGE_EXTENSIONS)}) and a txt "
                             f"caption in {len(shards)} shard(s)")
    return TarCorpus(entries, captions, size, workers, keys)


def load_images_under(root: str | Path, size: int, workers: int | None = None) -> FileCorpus:
    """Every image file under ``root`` (recursively, sorted), captions empty: an unlabelled pool."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ClipguardError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return FileCorpus(files, [""] * len(files), size, workers, str(root))


__all__ = ["FileCorpus", "LabelledCorpus", "TarCorpus", "expand_shards", "load_caption_csv", "load_images_under",
           "load_webdataset", "mentions"]
