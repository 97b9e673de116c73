"""Datasets: Fashion-MNIST, users' image folders, CSVs and webdataset shards, few-shot sampling."""

from clipguard.data.captions import PROMPT_TEMPLATES, training_caption
from clipguard.data.fewshot import few_shot_indices
from clipguard.data.fmnist import FMNIST_CLASSES, ImageSet, load_fmnist
from clipguard.data.folders import FolderImages, load_image_folder, load_imagenet_folder, load_labelled_csv
from clipguard.data.pairs import FileCorpus, LabelledCorpus, TarCorpus, load_caption_csv, load_webdataset
from clipguard.data.pool import DefenderData, Unlabelled, load_pool
from clipguard.data.specs import (
    Captions, Labelled, as_captions, as_labelled, has_splits, load_dataset, load_unlabelled, sample_images, split_root,
)
from clipguard.data.stream import default_workers, iterate_batches

__all__ = [
    "Captions", "DefenderData", "FMNIST_CLASSES", "FileCorpus", "FolderImages", "ImageSet", "Labelled",
    "LabelledCorpus", "PROMPT_TEMPLATES", "TarCorpus", "Unlabelled", "as_captions", "as_labelled",
    "default_workers", "few_shot_indices", "has_splits", "iterate_batches", "load_caption_csv", "load_dataset",
    "load_fmnist", "load_image_folder", "load_imagenet_folder", "load_labelled_csv", "load_pool", "load_unlabelled",
    "load_webdataset", "sample_images", "split_root", "training_caption",
]
