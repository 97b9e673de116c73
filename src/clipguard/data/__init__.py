"""Datasets: Fashion-MNIST, users' image folders and caption CSVs, few-shot sampling."""

from clipguard.data.captions import PROMPT_TEMPLATES, training_caption
from clipguard.data.fewshot import few_shot_indices
from clipguard.data.fmnist import FMNIST_CLASSES, ImageSet, load_fmnist
from clipguard.data.folders import FolderImages, load_caption_csv, load_image_folder


def load_dataset(name: str, split: str = "test", image_size: int = 28):
    """A labelled evaluation set: ``fmnist`` (an :class:`ImageSet`) or a path to an ImageFolder
    tree (a :class:`FolderImages`, decoded batch by batch)."""
    if name == "fmnist":
        return load_fmnist(split)
    return load_image_folder(name, image_size)


__all__ = [
    "FMNIST_CLASSES", "FolderImages", "ImageSet", "PROMPT_TEMPLATES", "few_shot_indices", "load_caption_csv",
    "load_dataset", "load_fmnist", "load_image_folder", "training_caption",
]
