"""Datasets: Fashion-MNIST, users' image folders and caption CSVs, few-shot sampling."""

from pathlib import Path

from clipguard import ClipguardError
from clipguard.data.captions import PROMPT_TEMPLATES, training_caption
from clipguard.data.fewshot import few_shot_indices
from clipguard.data.fmnist import FMNIST_CLASSES, ImageSet, load_fmnist
from clipguard.data.folders import (
    FolderImages, load_caption_csv, load_image_folder, load_imagenet_folder, load_labelled_csv,
)


SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}  # ImageFolder split sub-folders, in preference order


def split_root(root: Path, split: str) -> Path | None:
    """``root/train`` or ``root/test`` (``root/val``) when ``root`` holds a train and an evaluation
    split, else None (a folder without splits: every split is the whole folder)."""
    found = {name: next((root / d for d in dirs if (root / d).is_dir()), None) for name, dirs in SPLIT_FOLDERS.items()}
    return found[split] if all(found.values()) else None


def has_splits(name: str) -> bool:
    """Whether the labelled spec ``name`` has separate train and evaluation images."""
    if name == "fmnist":
        return True
    if name.startswith("csv:"):
        return False
    return split_root(Path(name.removeprefix("imagenet:")), "train") is not None


def load_dataset(name: str, split: str = "test", image_size: int = 28):
    """A labelled image set from a spec:

    - ``fmnist``: the built-in Fashion-MNIST (an :class:`ImageSet`);
    - ``DIR``: an ImageFolder tree; ``imagenet:DIR``: ImageNet synset folders with OpenAI's class
      names and templates; ``csv:FILE``: ``filepath,label`` rows (each a :class:`FolderImages`,
      decoded batch by batch).

    A tree with ``train/`` and ``val/`` (or ``test/``) sub-folders gives the asked split; one
    without (and a CSV) gives all its images for any split."""
    if name == "fmnist":
        return load_fmnist(split)
    if split not in SPLIT_FOLDERS:
        raise ClipguardError(f"split {split!r}: choose train or test")
    if name.startswith("csv:"):
        return load_labelled_csv(name[4:], image_size)
    kind, root = ("imagenet", Path(name[9:])) if name.startswith("imagenet:") else ("folder", Path(name))
    root = split_root(root, split) or root
    return load_imagenet_folder(root, image_size) if kind == "imagenet" else load_image_folder(root, image_size)


__all__ = [
    "FMNIST_CLASSES", "FolderImages", "ImageSet", "PROMPT_TEMPLATES", "few_shot_indices", "load_caption_csv",
    "has_splits", "load_dataset", "load_fmnist", "load_image_folder", "split_root", "training_caption",
]
