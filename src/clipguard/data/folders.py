"""Users' own labelled images: an ImageFolder-style tree (one sub-folder per class) or a CSV of (filepath, label), streamed."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipguard import ClipguardError
from clipguard.data.stream import default_workers

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def resize_crop(im: Image.Image, size: int) -> torch.Tensor:
    """uint8 (3, size, size) of a PIL image: RGB, resized (shorter side, bicubic) and centre-cropped."""
    im = im.convert("RGB")
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def read_image(path: Path, size: int) -> torch.Tensor:
    """uint8 (3, size, size) of an image file (:func:`resize_crop`); an unreadable file is a
    ClipguardError with its name."""
    try:
        with Image.open(path) as im:
            return resize_crop(im, size)
    except FileNotFoundError:
        raise ClipguardError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ClipguardError(f"cannot read image {path} ({err}); remove or replace the file") from None


class FolderImages:
    """An ImageFolder tree, listed up front and decoded only when a batch asks for it.

    The interface of :class:`ImageSet` that evaluation and few-shot sampling use (``labels``,
    ``classes``, ``image_size``, ``float_images``, ``subset``), but no image is held: memory does
    not grow with the folder, and ``subset`` (``--limit``, the shots) decodes only what it keeps.
    Long passes decode in ``workers`` DataLoader processes (:func:`~clipguard.data.stream.iterate_batches`
    calls :meth:`decode`); ``float_images`` decodes a few images at once in threads.

    files: the image paths (N,); labels: int64 (N,), positions in ``classes``.
    """

    streamed = True  # decoded on demand (see clipguard.data.stream.iterate_batches)

    def __init__(self, files: Sequence[Path], labels: torch.Tensor, classes: tuple[str, ...], size: int,
                 workers: int | None = None, templates: tuple[str, ...] | None = None):
        self.files, self.labels, self.classes, self.size = tuple(files), labels, classes, size
        self.workers = default_workers() if workers is None else workers
        self.templates = templates  # prompt templates ("a photo of a {}."); None: clipguard's defaults

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 (3, S, S)."""
        return read_image(self.files[index], self.size)

    @property
    def image_size(self) -> int:
        return self.size

    def float_images(self, index=slice(None)) -> torch.Tensor:
        """Float (B, 3, S, S) in [0, 1] for an index, slice or index tensor: decoded now."""
        if isinstance(index, int):
            index = [index]
        positions = range(len(self.files))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        paths = [self.files[i] for i in positions]
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers or 1, len(paths)))) as pool:
            decoded = list(pool.map(lambda path: read_image(path, self.size), paths))
        return torch.stack(decoded).float().div_(255) if decoded else torch.empty(0, 3, self.size, self.size)

    def subset(self, index: torch.Tensor) -> "FolderImages":
        keep = torch.as_tensor(index).tolist()
        return FolderImages([self.files[i] for i in keep], self.labels[index], self.classes, self.size, self.workers,
                            self.templates)

    def renamed(self, classes: tuple[str, ...] | None = None, templates: tuple[str, ...] | None = None):
        """The same images with other class names (same order) and/or prompt templates."""
        return FolderImages(self.files, self.labels, classes or self.classes, self.size, self.workers,
                            templates or self.templates)


CLASSNAMES_FILE = "classnames.txt"


def load_image_folder(root: str | Path, size: int, workers: int | None = None) -> FolderImages:
    """An ImageFolder tree ``root/<class>/<image>``: classes in sorted folder order, named by the
    folder (``_`` read as a space) or by ``root/classnames.txt`` (one name per line, same order).

    Only the file list is read here; images are decoded when a batch asks for them, and an
    unreadable one is then refused with its name (skipping it would change the counts).
    """
    root = Path(root)
    if not root.is_dir():
        raise ClipguardError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ClipguardError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    files, labels = [], []
    for label, name in enumerate(folders):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise ClipguardError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    classes = tuple(name.replace("_", " ") for name in folders)
    names_file = root / CLASSNAMES_FILE
    if names_file.is_file():
        names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
        if len(names) != len(folders):
            raise ClipguardError(f"{names_file} names {len(names)} classes but {root} has {len(folders)} class "
                                 "folders; give one name per folder, in sorted folder order")
        classes = names
    used = sorted(set(labels))
    if len(used) < 2:
        raise ClipguardError(f"{root} has images of one class only ({classes[used[0]]!r}); zero-shot "
                             "classification needs at least two classes")
    return FolderImages(files, torch.tensor(labels), classes, size, workers)


def load_imagenet_folder(root: str | Path, size: int, workers: int | None = None) -> FolderImages:
    """ImageNet-style synset folders (``root/n01440764/...``) with OpenAI's class names and 80 prompt
    templates (both from ``open_clip.zero_shot_metadata``). Each folder is named by its synset ID,
    looked up in the 1,000 IDs in class order that timm ships, so a subset of the synsets still
    gets the right names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo

    folder = load_image_folder(root, size, workers)
    order = {synset: i for i, synset in enumerate(ImageNetInfo().label_names())}
    folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in order]
    if unknown:
        raise ClipguardError(f"{Path(root) / unknown[0]}: {unknown[0]!r} is not one of the 1,000 ImageNet synset IDs "
                             "(nXXXXXXXX); use a plain folder path for other classes")
    classes = tuple(IMAGENET_CLASSNAMES[order[f]] for f in folders)
    templates = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    return FolderImages(folder.files, folder.labels, classes, size, workers, templates)


def read_csv_rows(path: Path, columns: tuple[str, ...], kind: str, separator: str = ",") -> list[dict]:
    """The rows of a CSV whose header has ``columns``; a missing file, header or row is a ClipguardError."""
    if not path.is_file():
        raise ClipguardError(f"{kind} CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
            wanted = " and ".join(f"'{c}'" for c in columns)
            raise ClipguardError(f"{path}: needs a header with columns {wanted} (separator {separator!r}), "
                                 f"got {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise ClipguardError(f"{path}: no rows")
    return rows


def load_labelled_csv(path: str | Path, size: int, workers: int | None = None) -> FolderImages:
    """Images listed in a CSV with columns ``filepath,label`` (the label a class name); classes in
    sorted name order; relative paths resolve against the CSV's folder. Streamed like a folder."""
    path = Path(path)
    rows = [(row["filepath"], row["label"].strip()) for row in read_csv_rows(path, ("filepath", "label"), "labelled")]
    classes = tuple(sorted({label for _, label in rows}))
    if len(classes) < 2:
        raise ClipguardError(f"{path}: every row has label {classes[0]!r}; zero-shot classification needs two classes")
    files = [path.parent / file for file, _ in rows]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise ClipguardError(f"{path}: image not found: {missing}")
    labels = torch.tensor([classes.index(label) for _, label in rows])
    return FolderImages(files, labels, classes, size, workers)
