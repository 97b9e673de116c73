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

import copy
import random
import re
import tarfile
from pathlib import Path
from typing import Sequence

import torch

from clipguard import ClipguardError
from clipguard.data.captions import training_caption
from clipguard.data.folders import IMAGE_SUFFIXES, read_csv_rows, read_image
from clipguard.data.images import checked_fit, decode_image
from clipguard.data.stream import default_workers

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset sample members read as the image


def mentions(captions: Sequence[str], name: str) -> torch.Tensor:
    """Bool (N,): which captions name ``name`` as whole words, case-insensitive."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name.lower())}(?![\w-])")
    return torch.tensor([bool(pattern.search(c.lower())) for c in captions], dtype=torch.bool)


class _Corpus:
    """Shared pieces: ``size`` (image side), ``workers`` (DataLoader processes), ``float_images``,
    ``fit`` (how an image becomes size x size: "crop" or "squash", see
    :func:`~clipguard.data.images.decode_image`) and :meth:`fitted`."""

    size: int
    workers: int
    fit: str = "crop"
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

    def fitted(self, fit: str):
        """The same pairs, their images decoded with ``fit`` ("crop" or "squash")."""
        view = copy.copy(self)
        view.fit = checked_fit(fit)
        return view


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

    def fitted(self, fit: str) -> "LabelledCorpus":
        # in-memory images are square at their size already: crop and squash are the same
        return LabelledCorpus(self.images.fitted(fit)) if self.streamed else self


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
                 source: str = "", fit: str = "crop"):
        self.files, self.captions, self.size = tuple(files), tuple(captions), size
        self.workers = default_workers() if workers is None else workers
        self.source = source
        self.fit = checked_fit(fit)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> torch.Tensor:
        return read_image(self.files[index], self.size, self.fit)

    def subset(self, index: torch.Tensor) -> "FileCorpus":
        keep = torch.as_tensor(index).tolist()
        return FileCorpus([self.files[i] for i in keep], [self.captions[i] for i in keep], self.size, self.workers,
                          self.source, self.fit)


class TarCorpus(_CaptionList):
    """webdataset shards read by offset: ``entries[i]`` = (shard, offset, size) of pair i's image.

    Samples group a tar's members by key as webdataset does (``dir/KEY.ext``); a sample is a pair
    when it has an image member (jpg, jpeg, png, webp) and a ``txt``."""

    def __init__(self, entries: Sequence[tuple[str, int, int]], captions: Sequence[str], size: int,
                 workers: int | None = None, keys: Sequence[str] = (), fit: str = "crop"):
        self.entries, self.captions, self.size = tuple(entries), tuple(captions), size
        self.keys = tuple(keys) or tuple(f"{s}:{o}" for s, o, _ in self.entries)
        self.workers = default_workers() if workers is None else workers
        self.fit = checked_fit(fit)

    def __len__(self) -> int:
        return len(self.entries)

    def decode(self, index: int) -> torch.Tensor:
        shard, offset, size = self.entries[index]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return decode_image(data, self.size, self.fit, name=f"{self.keys[index]} in {shard}",
                            fix="remove or replace that sample")

    def subset(self, index: torch.Tensor) -> "TarCorpus":
        keep = torch.as_tensor(index).tolist()
        return TarCorpus([self.entries[i] for i in keep], [self.captions[i] for i in keep], self.size, self.workers,
                         [self.keys[i] for i in keep], self.fit)


def load_caption_csv(path: str | Path, size: int, separator: str = ",", img_key: str = "filepath",
                     caption_key: str = "caption", workers: int | None = None) -> FileCorpus:
    """A CSV of pairs with columns ``img_key`` and ``caption_key`` (open_clip's ``--csv-img-key``,
    ``--csv-caption-key``, ``--csv-separator``). Every listed image must exist and every caption be
    non-empty (checked now, by line: an empty caption would train on nothing)."""
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


def index_shards(shards: Sequence[Path], need_captions: bool = True
                 ) -> tuple[list[tuple[str, int, int]], list[str], list[str]]:
    """(image entries, captions, keys) of every image + txt sample in ``shards``, in shard order.

    One pass over the tar headers; the small ``txt`` members are read (UTF-8), the images are not.
    With ``need_captions`` a sample with an image and no caption (or an empty one), or a caption
    and no image, is a ClipguardError naming the shard and key (dropping it would shrink the
    corpus unseen); without, captions are not read (an unlabelled pool) and are all empty."""
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
                    if ext == "txt" and need_captions:
                        sample["txt"] = _caption_text(shard, member.name, tar.extractfile(member).read())
                    elif ext in IMAGE_EXTENSIONS and "image" not in sample:
                        sample["image"] = (str(shard), member.offset_data, member.size)
        except (tarfile.TarError, OSError) as err:
            raise ClipguardError(f"cannot read webdataset shard {shard} ({err}); replace or remove it") from None
        if need_captions:
            _check_pairs(shard, samples)
        for key, sample in samples.items():
            if "image" in sample:
                entries.append(sample["image"])
                captions.append(sample.get("txt", ""))
                keys.append(key)
    return entries, captions, keys


def _caption_text(shard: Path, member: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ClipguardError(f"{shard}: caption {member} is not UTF-8 text; save the captions as UTF-8") from None


def _check_pairs(shard: Path, samples: dict[str, dict]) -> None:
    """Refuse a shard with samples that are not image + caption pairs, naming the first."""
    for problem, bad in (
        ("an image and no txt caption", [k for k, s in samples.items() if "image" in s and "txt" not in s]),
        ("an empty txt caption", [k for k, s in samples.items() if "image" in s and s.get("txt") == ""]),
        (f"a txt caption and no image ({', '.join(IMAGE_EXTENSIONS)})",
         [k for k, s in samples.items() if "txt" in s and "image" not in s]),
    ):
        if bad:
            raise ClipguardError(f"{shard}: {len(bad)} of {len(samples)} samples have {problem} (first: {bad[0]}); "
                                 "give every sample an image and a caption (KEY.jpg + KEY.txt) or remove the others")


def load_webdataset(spec: str, size: int, workers: int | None = None, need_captions: bool = True) -> TarCorpus:
    """The image + caption pairs of the webdataset shards ``spec`` (e.g. ``data/{00000..00099}.tar``);
    ``need_captions`` False: every image, captions empty (an unlabelled pool)."""
    shards = expand_shards(spec)
    entries, captions, keys = index_shards(shards, need_captions)
    if not entries:
        raise ClipguardError(f"wds:{spec}: no sample with an image ({', '.join(IMAGE_EXTENSIONS)})"
                             f"{' and a txt caption' if need_captions else ''} in {len(shards)} shard(s)")
    return TarCorpus(entries, captions, size, workers, keys)


def load_images_under(root: str | Path, size: int, workers: int | None = None) -> FileCorpus:
    """Every image file under ``root`` (recursively, sorted; hidden files and folders, such as
    ``.ipynb_checkpoints``, left out; symlinked folders not followed), captions empty: an unlabelled pool."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ClipguardError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return FileCorpus(files, [""] * len(files), size, workers, str(root))


__all__ = ["FileCorpus", "LabelledCorpus", "TarCorpus", "expand_shards", "load_caption_csv", "load_images_under",
           "load_webdataset", "mentions"]
