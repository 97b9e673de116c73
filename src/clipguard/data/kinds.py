"""Each kind of data spec as one class: how its string is recognised, which splits it has, how it
loads and what it adds to a cache key beyond its string.

:class:`~clipguard.data.specs.Labelled` and :class:`~clipguard.data.specs.Captions` hold a spec
with its options and hand the work to the first kind that ``matches`` it (:func:`labelled_kind`,
:func:`caption_kind`); nothing outside this module tests a spec's prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from clipguard import ClipguardError
from clipguard.data.fmnist import FMNIST_CLASSES, load_fmnist
from clipguard.data.folders import load_image_folder, load_imagenet_folder, load_labelled_csv, read_csv_rows
from clipguard.data.pairs import LabelledCorpus, load_caption_csv, load_webdataset

SPLITS = ("train", "test")  # the splits a spec with splits has
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}  # ImageFolder split sub-folders, in preference order
CAPTION_SPECS = "fmnist, fmnist-web[:plain=P], csv:FILE or wds:SHARDS"  # what --captions takes, for errors


def split_root(root: Path, split: str) -> Path | None:
    """``root/train`` or ``root/test`` (``root/val``) when ``root`` holds a train and an evaluation
    split, else None (a folder without splits: every split is the whole folder)."""
    found = {name: next((root / d for d in dirs if (root / d).is_dir()), None) for name, dirs in SPLIT_FOLDERS.items()}
    return found[split] if all(found.values()) else None


class SpecKind:
    """What every kind shares: recognised by ``prefix``, holding the spec's ``options``."""

    prefix: ClassVar[str]  # the spec itself ("fmnist"), or its prefix ("csv:")

    def __init__(self, options):
        self.options = options
        self.spec = options.spec

    @classmethod
    def matches(cls, spec: str) -> bool:
        """Whether ``spec`` is of this kind: the spec itself, or a prefix ending in ':'."""
        return spec.startswith(cls.prefix) if cls.prefix.endswith(":") else spec == cls.prefix


# ----------------------------------------------------------------------------- labelled images
class LabelledKind(SpecKind):
    """One kind of ``--dataset`` spec; ``options`` is the :class:`~clipguard.data.specs.Labelled` holding it."""

    def splits(self) -> tuple[str, ...]:
        """The splits it has: ``("train", "test")``, or () when every split is all its images."""
        return SPLITS

    def read_options(self) -> list[str]:
        """Options beyond the string that change what it reads ([] when at their defaults)."""
        return []

    def load(self, split: str, image_size: int):
        raise NotImplementedError


class FmnistImages(LabelledKind):
    """``fmnist``: Fashion-MNIST's train and test files."""

    prefix = "fmnist"

    def load(self, split: str, image_size: int):
        return load_fmnist(split)


class FmnistValImages(LabelledKind):
    """``fmnist-val``: shots from train[:55000], evaluation on the held-out train[55000:]."""

    prefix = "fmnist-val"

    def load(self, split: str, image_size: int):
        from clipguard.data.web import validation_split

        return validation_split(split)


class _FolderKind(LabelledKind):
    """A kind read from files: the split must be train or test."""

    def load(self, split: str, image_size: int):
        if split not in SPLIT_FOLDERS:
            raise ClipguardError(f"split {split!r}: choose train or test")
        return self._load(split, image_size)


class CsvImages(_FolderKind):
    """``csv:FILE``: ``filepath,label`` rows (or the columns and separator of the options); no splits."""

    prefix = "csv:"

    def splits(self) -> tuple[str, ...]:
        return ()

    def read_options(self) -> list[str]:
        o = self.options
        options = [o.csv_separator, o.csv_img_key, o.csv_label_key]
        return options if options != [",", "filepath", "label"] else []

    def _load(self, split: str, image_size: int):
        o = self.options
        return load_labelled_csv(self.spec[4:], image_size, o.workers, o.csv_separator, o.csv_img_key,
                                 o.csv_label_key)


class ImagenetFolder(_FolderKind):
    """``imagenet:DIR``: synset folders named by ID (OpenAI's class names and templates)."""

    prefix = "imagenet:"

    def splits(self) -> tuple[str, ...]:
        return SPLITS if split_root(Path(self.spec[9:]), "train") is not None else ()

    def _load(self, split: str, image_size: int):
        root = Path(self.spec[9:])
        return load_imagenet_folder(split_root(root, split) or root, image_size, self.options.workers)


class ImageFolder(_FolderKind):
    """``DIR``: an ImageFolder (``DIR/<class>/<image>``); ``train/`` + ``val/`` or ``test/`` are its splits."""

    prefix = ""

    @classmethod
    def matches(cls, spec: str) -> bool:
        return True  # the last kind tried: any other string is a folder

    def splits(self) -> tuple[str, ...]:
        return SPLITS if split_root(Path(self.spec), "train") is not None else ()

    def _load(self, split: str, image_size: int):
        root = Path(self.spec)
        return load_image_folder(split_root(root, split) or root, image_size, self.options.workers,
                                 named_elsewhere=self.options.classnames is not None)


LABELLED_KINDS = (FmnistImages, FmnistValImages, CsvImages, ImagenetFolder, ImageFolder)


def labelled_kind(options) -> LabelledKind:
    """The kind of a :class:`~clipguard.data.specs.Labelled` spec."""
    return next(kind for kind in LABELLED_KINDS if kind.matches(options.spec))(options)


# ----------------------------------------------------------------------------- image-caption pairs
class CaptionKind(SpecKind):
    """One kind of ``--captions`` spec; ``options`` is the :class:`~clipguard.data.specs.Captions` holding it."""

    builtin: ClassVar[bool] = False  # a corpus shipped with clipguard: 28 px images whatever the model
    classes: ClassVar[tuple[str, ...] | None] = None  # its own class names (None: the evaluation data's)

    def check(self) -> None:
        """Refuse (ClipguardError) what can be refused without decoding anything."""

    def load(self, image_size: int):
        raise NotImplementedError


class FmnistPairs(CaptionKind):
    """``fmnist``: Fashion-MNIST's train split with drawn captions."""

    builtin, classes = True, FMNIST_CLASSES

    prefix = "fmnist"

    def load(self, image_size: int):
        return LabelledCorpus(load_fmnist("train"))


class WebPairs(CaptionKind):
    """``fmnist-web[:plain=P]``: the train items rendered as web photos (:mod:`clipguard.data.web`)."""

    prefix, builtin = "fmnist-web", True

    @classmethod
    def matches(cls, spec: str) -> bool:
        return spec == cls.prefix or spec.startswith(cls.prefix + ":")

    def check(self) -> None:
        from clipguard.data.web import web_spec

        web_spec(self.spec)  # a bad plain share is refused there

    def load(self, image_size: int):
        from clipguard.data.web import WebCorpus, web_spec

        return WebCorpus(plain_share=web_spec(self.spec))


class CsvPairs(CaptionKind):
    """``csv:FILE``: image-caption rows, open_clip's separator and column options."""

    prefix = "csv:"

    def check(self) -> None:
        o = self.options
        read_csv_rows(Path(self.spec[4:]), (o.csv_img_key, o.csv_caption_key), "caption", o.csv_separator)

    def load(self, image_size: int):
        o = self.options
        return load_caption_csv(self.spec[4:], image_size, o.csv_separator, o.csv_img_key, o.csv_caption_key,
                                o.workers)


class WdsPairs(CaptionKind):
    """``wds:SHARDS``: webdataset tar shards of jpg + txt, brace-expanded."""

    prefix = "wds:"

    def check(self) -> None:
        from clipguard.data.pairs import expand_shards

        expand_shards(self.spec[4:])

    def load(self, image_size: int):
        return load_webdataset(self.spec[4:], image_size, self.options.workers)


CAPTION_KINDS = (FmnistPairs, WebPairs, CsvPairs, WdsPairs)


def caption_kind(options) -> CaptionKind:
    """The kind of a :class:`~clipguard.data.specs.Captions` spec; an unknown one is refused."""
    for kind in CAPTION_KINDS:
        if kind.matches(options.spec):
            return kind(options)
    raise ClipguardError(f"--captions {options.spec!r}: expected {CAPTION_SPECS}")


# ----------------------------------------------------------------------------- unlabelled pools
class PoolKind(SpecKind):
    """One kind of ``--pool`` spec, images only (labels and captions ignored); ``options`` is the
    :class:`~clipguard.data.specs.Captions` whose CSV options a ``csv:`` pool is read with."""

    def __init__(self, spec: str, options, workers: int | None):
        self.spec, self.options, self.workers = spec, options, workers

    def load(self, image_size: int):
        raise NotImplementedError


class FmnistPool(PoolKind):
    """``fmnist``: its train split."""

    prefix = "fmnist"

    def load(self, image_size: int):
        return LabelledCorpus(load_fmnist("train"))


class CsvPool(PoolKind):
    """``csv:FILE``: its image column (``filepath``, or the options' ``csv_img_key``)."""

    prefix = "csv:"

    def load(self, image_size: int):
        from clipguard.data.pairs import FileCorpus

        path, key = Path(self.spec[4:]), self.options.csv_img_key
        rows = read_csv_rows(path, (key,), "image", self.options.csv_separator)
        return FileCorpus([path.parent / r[key] for r in rows], [""] * len(rows), image_size, self.workers, str(path))


class WdsPool(PoolKind):
    """``wds:SHARDS``: the shards' images (a pool needs no captions)."""

    prefix = "wds:"

    def load(self, image_size: int):
        return load_webdataset(self.spec[4:], image_size, self.workers, need_captions=False)


class FolderPool(PoolKind):
    """``DIR`` or ``imagenet:DIR``: every image under the folder."""

    prefix = ""

    @classmethod
    def matches(cls, spec: str) -> bool:
        return True  # the last kind tried

    def load(self, image_size: int):
        from clipguard.data.pairs import load_images_under

        root = Path(self.spec.removeprefix("imagenet:"))
        if not root.is_dir():
            raise ClipguardError(f"pool {self.spec!r}: expected fmnist, fmnist-train:N, a folder, imagenet:DIR, "
                                 f"csv:FILE or wds:SHARDS (no such folder: {root})")
        return load_images_under(root, image_size, self.workers)


POOL_KINDS = (FmnistPool, CsvPool, WdsPool, FolderPool)


def pool_kind(spec: str, options, workers: int | None = None) -> PoolKind:
    """The kind of an unlabelled ``--pool`` spec."""
    return next(kind for kind in POOL_KINDS if kind.matches(spec))(spec, options, workers)
