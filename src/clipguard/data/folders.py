"""Users' own labelled images: an ImageFolder-style tree (one sub-folder per class) or a CSV of (filepath, label), streamed."""

from __future__ import annotations

import csv
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from clipguard import ClipguardError
from clipguard.data.classes import check_class_names
from clipguard.data.images import checked_fit, decode_image
from clipguard.data.stream import default_workers

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image(path: Path, size: int, fit: str = "crop") -> torch.Tensor:
    """uint8 (3, size, size) of an image file, by the one decoder
    (:func:`~clipguard.data.images.decode_image`); an unreadable file is a ClipguardError with its name."""
    return decode_image(path, size, fit)


class FolderImages:
    """An ImageFolder tree, listed up front and decoded only when a batch asks for it.

    The interface of :class:`ImageSet` that evaluation and few-shot sampling use (``labels``,
    ``classes``, ``image_size``, ``float_images``, ``subset``), but no image is held: memory does
    not grow with the folder, and ``subset`` (``--limit``, the shots) decodes only what it keeps.
    Long passes decode in ``workers`` DataLoader processes (:func:`~clipguard.data.stream.iterate_batches`
    calls :meth:`decode`); ``float_images`` decodes a few images at once in threads.

    files: the image paths (N,); labels: int64 (N,), positions in ``classes``.
    fit: how each image becomes S x S, "crop" (shorter side resized, centre crop) or "squash"
    (the full frame resized, aspect ratio not kept); :meth:`fitted` gives the other view.
    """

    streamed = True  # decoded on demand (see clipguard.data.stream.iterate_batches)

    def __init__(self, files: Sequence[Path], labels: torch.Tensor, classes: tuple[str, ...], size: int,
                 workers: int | None = None, templates: tuple[str, ...] | None = None, fit: str = "crop"):
        self.files, self.labels, self.classes, self.size = tuple(files), labels, classes, size
        self.workers = default_workers() if workers is None else workers
        self.templates = templates  # prompt templates ("a photo of a {}."); None: clipguard's defaults
        self.fit = checked_fit(fit)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 (3, S, S)."""
        return read_image(self.files[index], self.size, self.fit)

    def fitted(self, fit: str) -> "FolderImages":
        """The same files, labels and classes, decoded with ``fit`` ("crop" or "squash")."""
        return FolderImages(self.files, self.labels, self.classes, self.size, self.workers, self.templates, fit)

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
            decoded = list(pool.map(lambda path: read_image(path, self.size, self.fit), paths))
        return torch.stack(decoded).float().div_(255) if decoded else torch.empty(0, 3, self.size, self.size)

    def subset(self, index: torch.Tensor) -> "FolderImages":
        keep = torch.as_tensor(index).tolist()
        return FolderImages([self.files[i] for i in keep], self.labels[index], self.classes, self.size, self.workers,
                            self.templates, self.fit)

    def renamed(self, classes: tuple[str, ...] | None = None, templates: tuple[str, ...] | None = None):
        """The same images with other class names (same order) and/or prompt templates."""
        return FolderImages(self.files, self.labels, classes or self.classes, self.size, self.workers,
                            templates or self.templates, self.fit)


CLASSNAMES_FILE = "classnames.txt"
SYNSET_ID = re.compile(r"n\d{8}")  # a WordNet synset ID, as ImageNet names its class folders


def not_utf8(path: Path) -> ClipguardError:
    """The error for a text file that is not UTF-8, naming its first bad line (a byte 0x0a is never
    inside a UTF-8 character, so lines decode on their own)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return ClipguardError(f"{path}, line {number}: not UTF-8 text (byte {line[err.start]:#04x}); "
                                      "save the file as UTF-8")
    return ClipguardError(f"{path}: not UTF-8 text; save the file as UTF-8")


def read_lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file (a BOM allowed), stripped;
    a missing, empty or non-UTF-8 file is a ClipguardError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ClipguardError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    lines = [(number, line.strip()) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise ClipguardError(f"{path}: no {what} (one per line)")
    return lines


def class_folders(root: Path) -> list[Path]:
    """The class folders of an ImageFolder ``root``, sorted by name: its sub-folders, less hidden
    ones (``.ipynb_checkpoints``) and symlinks that are broken, loop, or lead to ``root`` or above
    it. Two entries that are one folder (a symlink to a sibling) are a ClipguardError."""
    here, folders, targets = root.resolve(), [], {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):
                logger.warning("%s: a broken or looping symlink, not a class folder", path)
                continue
            if target == here or target in here.parents:
                logger.warning("%s links to %s or a folder above it: not a class folder", path, root)
                continue
        if not path.is_dir():
            continue
        target = path.resolve()
        if target in targets:
            raise ClipguardError(f"{root}: class folders {targets[target].name!r} and {path.name!r} are one folder "
                                 "(a symlink); remove the link or copy the images")
        targets[target] = path
        folders.append(path)
    return folders


def load_image_folder(root: str | Path, size: int, workers: int | None = None,
                      named_elsewhere: bool = False) -> FolderImages:
    """An ImageFolder tree ``root/<class>/<image>``: classes in sorted folder order, named by the
    folder (``_`` read as a space) or by ``root/classnames.txt`` (one name per line, same order).

    The class-list rule (README, "Your data"): hidden entries are neither classes nor images,
    symlinks to ``root`` or above are not classes (:func:`class_folders`); an empty class folder,
    names that read alike (:func:`~clipguard.data.classes.check_class_names`) and folders all
    named by synset ID (``imagenet:DIR`` names those; ``named_elsewhere``: the caller names the
    classes) are refused. Only the file list is read here; images are decoded when a batch asks
    for them, and an unreadable one is then refused with its name (skipping it would change the counts).
    """
    root = Path(root)
    if not root.is_dir():
        raise ClipguardError(f"image folder not found: {root}")
    folders = class_folders(root)
    if not folders:
        raise ClipguardError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    files, labels = [], []
    for label, folder in enumerate(folders):
        with os.scandir(folder) as entries:  # d_type: no stat per file (ImageNet's train split is 1.28M files)
            images = sorted(folder / e.name for e in entries if not e.name.startswith(".")
                            and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
        if not images:
            raise ClipguardError(f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                 "add its images or remove the folder (an empty class would still be a class)")
        files += images
        labels += [label] * len(images)
    names_file = root / CLASSNAMES_FILE
    if names_file.is_file():
        lines = read_lines(names_file, "class names")
        classes = tuple(text for _, text in lines)
        check_class_names(classes, [f"line {number}" for number, _ in lines], str(names_file))
        if len(classes) != len(folders):
            raise ClipguardError(f"{names_file} names {len(classes)} classes but {root} has {len(folders)} class "
                                 "folders; give one name per folder, in sorted folder order")
    else:
        classes = tuple(folder.name.replace("_", " ") for folder in folders)
        check_class_names(classes, [f"folder {folder.name!r}" for folder in folders], str(root))
        if not named_elsewhere and all(SYNSET_ID.fullmatch(folder.name) for folder in folders):
            given = root.parent if root.name in ("train", "val", "test") else root
            raise ClipguardError(f"{root}: every class folder is a WordNet synset ID ({folders[0].name}, ...); use "
                                 f"--dataset imagenet:{given} for ImageNet's class names (or name the classes in "
                                 f"{names_file} or with --classnames FILE)")
    if len(folders) < 2:
        raise ClipguardError(f"{root} has images of one class only ({classes[0]!r}); zero-shot "
                             "classification needs at least two classes")
    return FolderImages(files, torch.tensor(labels), classes, size, workers)


def load_imagenet_folder(root: str | Path, size: int, workers: int | None = None) -> FolderImages:
    """ImageNet-style synset folders (``root/n01440764/...``) with OpenAI's class names and 80 prompt
    templates (both from ``open_clip.zero_shot_metadata``). Each folder is named by its synset ID,
    looked up in the 1,000 IDs in class order that timm ships, so a subset of the synsets still
    gets the right names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo

    folder = load_image_folder(root, size, workers, named_elsewhere=True)
    order = {synset: i for i, synset in enumerate(ImageNetInfo().label_names())}
    first = {}  # label -> the folder its images are in
    for path, label in zip(folder.files, folder.labels.tolist()):
        first.setdefault(label, path.parent.name)
    folders = [first[label] for label in range(len(first))]
    unknown = [f for f in folders if f not in order]
    if unknown:
        raise ClipguardError(f"{Path(root) / unknown[0]}: {unknown[0]!r} is not one of the 1,000 ImageNet synset IDs "
                             "(nXXXXXXXX); use a plain folder path for other classes")
    classes = tuple(IMAGENET_CLASSNAMES[order[f]] for f in folders)
    templates = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    return FolderImages(folder.files, folder.labels, classes, size, workers, templates)


def read_csv_rows(path: Path, columns: tuple[str, ...], kind: str, separator: str = ",") -> list[dict]:
    """The rows of a UTF-8 CSV (a BOM allowed) whose header has ``columns``. Every row is checked
    now: as many fields as the header, and a non-empty value in each of ``columns``. A missing
    file, header or row, a bad row (by line number) or a non-UTF-8 file is a ClipguardError."""
    if not path.is_file():
        raise ClipguardError(f"{kind} CSV not found: {path}")
    separator = {"\\t": "\t"}.get(separator, separator)  # '\t' typed without $'...' (pandas, in open_clip, reads it so)
    if len(separator) != 1:
        raise ClipguardError(f"--csv-separator {separator!r}: give one character (a TSV: --csv-separator $'\\t')")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=separator)
            header = next(reader, None)
            if not header or not set(columns) <= set(header):
                wanted = " and ".join(f"'{c}'" for c in columns)
                raise ClipguardError(f"{path}: needs a header with columns {wanted} (separator {separator!r}), "
                                     f"got {header}")
            for fields in reader:
                if not "".join(fields).strip():
                    continue  # a blank line
                if len(fields) != len(header):
                    raise ClipguardError(f"{path}, line {reader.line_num}: {len(fields)} field(s) where the header has "
                                         f"{len(header)} (separator {separator!r}); fix the row, or quote a field that "
                                         "holds the separator")
                row = dict(zip(header, fields))
                empty = next((column for column in columns if not row[column].strip()), None)
                if empty is not None:
                    raise ClipguardError(f"{path}, line {reader.line_num}: empty {empty!r}; fill it in or remove "
                                         "the row")
                rows.append(row)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as err:
        raise ClipguardError(f"{path}: not a readable CSV ({err}); check its quoting") from None
    if not rows:
        raise ClipguardError(f"{path}: no rows")
    return rows


def load_labelled_csv(path: str | Path, size: int, workers: int | None = None, separator: str = ",",
                      img_key: str = "filepath", label_key: str = "label") -> FolderImages:
    """Images listed in a CSV with columns ``img_key,label_key`` (``filepath,label``; the label a
    class name); classes in sorted name order, under the class-list rule (no empty label, no two
    that read alike); relative paths resolve against the CSV's folder. Streamed like a folder."""
    path = Path(path)
    rows = [(row[img_key], row[label_key].strip())
            for row in read_csv_rows(path, (img_key, label_key), "labelled", separator)]
    classes = tuple(sorted({label for _, label in rows}))
    check_class_names(classes, [f"label {name!r}" for name in classes], str(path))
    if len(classes) < 2:
        raise ClipguardError(f"{path}: every row has label {classes[0]!r}; zero-shot classification needs two classes")
    files = [path.parent / file for file, _ in rows]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise ClipguardError(f"{path}: image not found: {missing}")
    position = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([position[label] for _, label in rows])
    return FolderImages(files, labels, classes, size, workers)
