"""One grammar for data across commands (README, "Your data").

- Labelled images (``--dataset``): ``fmnist``, ``fmnist-val`` (shots from train[:55000],
  evaluation on train[55000:]), ``DIR`` (an ImageFolder), ``imagenet:DIR`` (synset
  folders), ``csv:FILE`` (``filepath,label``, or the columns and separator ``--csv-img-key``,
  ``--csv-label-key``, ``--csv-separator`` name); ``--classnames FILE`` / ``--templates FILE``
  override the class names and prompt templates of any of them (:class:`Labelled`).
- Image-caption pairs (``--captions``): ``fmnist``, ``fmnist-web`` (train items rendered as web
  photos, :mod:`clipguard.data.web`; ``fmnist-web:plain=P`` leaves a share P of them plain),
  ``csv:FILE`` (open_clip's separator and column options), ``wds:SHARDS`` (webdataset tar
  shards, brace-expanded) (:class:`Captions`).
- An unlabelled pool (``--pool``): any of the above, labels and captions ignored (:func:`load_unlabelled`).

A spec given as a plain string means its defaults; the dataclasses carry the options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard import ClipguardError
from clipguard.data.captions import template_problem
from clipguard.data.classes import check_class_names
from clipguard.data.fmnist import ImageSet
from clipguard.data.folders import FolderImages, read_lines
from clipguard.data.kinds import CAPTION_SPECS, SPLIT_FOLDERS, caption_kind, labelled_kind, pool_kind, split_root  # noqa: F401

def class_names_file(path: str) -> tuple[str, ...]:
    """The names of a --classnames file (one per line), under the class-list rule: a repeated name is
    refused by line number."""
    lines = read_lines(path, "class names")
    names = tuple(text for _, text in lines)
    check_class_names(names, [f"line {number}" for number, _ in lines], path)
    return names


def templates_file(path: str) -> tuple[str, ...]:
    """The prompt templates of a --templates file (one per line), each with exactly one ``{}``
    (:func:`~clipguard.data.captions.template_problem`); a bad one is refused by line number."""
    lines = read_lines(path, "prompt templates")
    for number, text in lines:
        problem = template_problem(text)
        if problem:
            raise ClipguardError(f"{path}, line {number}: template {text!r} {problem}")
    return tuple(text for _, text in lines)


@dataclass(frozen=True)
class Labelled:
    """A labelled-image spec with its options. ``str()`` gives the spec as the user wrote it."""

    spec: str = "fmnist"
    classnames: str | None = None  # a file of class names, one per line, in the dataset's class order
    templates: str | None = None  # a file of prompt templates with {} for the class name, one per line
    workers: int | None = None  # DataLoader worker processes (None: the core count, at most 8)
    csv_separator: str = ","  # a csv: spec's separator and columns (--csv-separator, --csv-img-key, --csv-label-key)
    csv_img_key: str = "filepath"
    csv_label_key: str = "label"

    def __str__(self) -> str:
        return self.spec

    @property
    def kind(self):
        """Its :mod:`~clipguard.data.kinds` class (fmnist, fmnist-val, csv:, imagenet: or a folder)."""
        return labelled_kind(self)

    def splits(self) -> tuple[str, ...]:
        """``("train", "test")``, or () when every split is all its images (a flat folder, a CSV)."""
        return self.kind.splits()

    @property
    def has_splits(self) -> bool:
        """Whether the spec has separate train and evaluation images."""
        return bool(self.splits())

    def read_options(self) -> list[str]:
        """The options that change what the spec reads, beyond its string: a csv: spec's separator
        and columns when not the defaults (another column is other labels); [] otherwise."""
        return self.kind.read_options()

    def check(self) -> "Labelled":
        """Refuse (ClipguardError, before any work) a missing path, a single class, a bad class-names
        or templates file: the files are listed and the override files applied, nothing decoded."""
        self.load("test", 28)
        return self

    def trigger_fit_key(self, split: str) -> str:
        """What a trigger fitted on ``split`` of this spec adds to the trigger cache's key: nothing
        for the built-in ``fmnist`` (old fits stay valid)."""
        return "" if self.spec == "fmnist" else f"{self.spec}/{split}"

    def key(self) -> dict:
        """What this spec adds to a cache key: nothing for the built-in ``fmnist`` (old keys stay
        valid), else the spec, the override files and the read options."""
        if (self.spec, self.classnames, self.templates) == ("fmnist", None, None):
            return {}
        return {"dataset": [self.spec, self.classnames, self.templates, *self.read_options()]}

    def _overrides(self) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        names = class_names_file(self.classnames) if self.classnames else None
        templates = templates_file(self.templates) if self.templates else None
        return names, templates

    def load(self, split: str = "test", image_size: int = 28) -> ImageSet | FolderImages:
        """The asked split's images (the whole set when the spec has no splits)."""
        spec = self.spec
        images = self.kind.load(split, image_size)
        names, templates = self._overrides()
        if names is not None and len(names) != len(images.classes):
            raise ClipguardError(f"{self.classnames} names {len(names)} classes but {spec} has {len(images.classes)}; "
                                 "give one name per class, in the dataset's class order")
        return images if names is None and templates is None else images.renamed(names, templates)


@dataclass(frozen=True)
class Captions:
    """An image-caption spec with open_clip's CSV options."""

    spec: str = "fmnist"
    csv_separator: str = ","
    csv_img_key: str = "filepath"
    csv_caption_key: str = "caption"
    workers: int | None = None

    def __str__(self) -> str:
        return self.spec

    @property
    def kind(self):
        """Its :mod:`~clipguard.data.kinds` class (fmnist, fmnist-web, csv: or wds:); an unknown spec is refused."""
        return caption_kind(self)

    @property
    def builtin(self) -> bool:
        """Whether this is a built-in corpus (``fmnist``, ``fmnist-web``): 28 px images whatever the model."""
        return self.kind.builtin

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The corpus's own class names (``fmnist``'s); None for a caption corpus, whose attacker
        takes the classes of the evaluation data."""
        return self.kind.classes

    def image_size(self, model_size: int) -> int:
        """The size the corpus's images have (what a trigger acts on): a built-in corpus's 28 px,
        a user's decoded at ``model_size``."""
        return 28 if self.builtin else model_size

    def check(self) -> "Captions":
        """Refuse (ClipguardError, before any work) an unknown spec, a missing caption CSV (or one
        without its columns) or shard; nothing is decoded."""
        self.kind.check()
        return self

    def key(self) -> dict:
        """What this corpus adds to a cache key: nothing for ``fmnist`` (old keys stay valid), else
        the spec and open_clip's CSV options."""
        if self.spec == "fmnist":
            return {}
        return {"captions": [self.spec, self.csv_separator, self.csv_img_key, self.csv_caption_key]}

    def load(self, image_size: int = 28):
        """The corpus (:mod:`clipguard.data.pairs`): Fashion-MNIST's train split with drawn captions,
        a CSV of pairs, or webdataset shards."""
        return self.kind.load(image_size)


def as_labelled(spec: str | Labelled) -> Labelled:
    return spec if isinstance(spec, Labelled) else Labelled(str(spec))


def as_captions(spec: str | Captions) -> Captions:
    return spec if isinstance(spec, Captions) else Captions(str(spec))


def load_dataset(spec: str | Labelled, split: str = "test", image_size: int = 28) -> ImageSet | FolderImages:
    """A labelled image set from a spec (see :class:`Labelled`). A tree with ``train/`` and
    ``val/`` (or ``test/``) sub-folders gives the asked split; one without (and a CSV) gives all
    its images for any split. Folders and CSVs are listed here and decoded batch by batch."""
    return as_labelled(spec).load(split, image_size)


def has_splits(spec: str | Labelled) -> bool:
    return as_labelled(spec).has_splits


def load_unlabelled(spec: str, image_size: int, captions: Captions | None = None, workers: int | None = None):
    """Images of any spec with labels and captions ignored (an oracle's pool): ``fmnist`` (its
    train split), a folder (every image under it), ``imagenet:DIR``, ``csv:FILE`` (its
    ``filepath`` column, or ``captions.csv_img_key``) or ``wds:SHARDS``."""
    return pool_kind(spec, captions or Captions(), workers).load(image_size)


def sample_images(images, count: int | None, seed: int | torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` seeded images (all when None or more than there are) of a set: float (N, 3, S, S)
    decoded now (only those, in DataLoader workers), and their positions. ``seed``: an int or a
    generator to draw from."""
    from clipguard.data.stream import iterate_batches

    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    if not len(images):
        raise ClipguardError("no images to sample from")
    index = torch.randperm(len(images), generator=generator)
    index = index[: count] if count is not None else index
    batches = list(index.split(256))
    decoded = list(iterate_batches(images, batches))
    size = images.image_size
    return (torch.cat(decoded) if decoded else torch.empty(0, 3, size, size)), index
