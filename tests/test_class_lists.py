"""The one class-list rule (hidden entries, looping symlinks, names that read alike, repeated
names, empty labels and folders), text files read as UTF-8 with errors that name the file and
line, CSV rows checked when read, webdataset samples that are not pairs, templates, labelled
TSVs, synset folders without imagenet:, and how a dataset without splits is reported (issue 31)."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipguard import ClipguardError
from clipguard.data import Captions, Labelled, load_dataset, load_unlabelled

from conftest import refused


def _image(path, value=80):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _folder(root, names=("bag", "coat"), per_class=2):
    for c, name in enumerate(names):
        for i in range(per_class):
            _image(root / name / f"{i}.png", 40 * c + i)
    return root


def _refused(match, load):
    with pytest.raises(ClipguardError, match=match) as info:
        load()
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ which entries are classes
def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    root = _folder(tmp_path / "data")
    _image(root / ".ipynb_checkpoints" / "0.png")
    _image(root / "bag" / "._0.png")  # macOS AppleDouble file
    images = load_dataset(str(root))
    assert images.classes == ("bag", "coat") and len(images) == 4


def test_symlinks_to_the_folder_or_above_or_looping_are_not_classes(tmp_path):
    root = _folder(tmp_path / "data")
    os.symlink(".", root / "self")
    os.symlink("..", root / "up")
    os.symlink("loop", root / "loop")  # a link to itself
    images = load_dataset(str(root))
    assert images.classes == ("bag", "coat") and len(images) == 4


def test_a_symlink_to_a_sibling_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "data")
    os.symlink("bag", root / "handbag")
    _refused("'bag' and 'handbag' are one folder", lambda: load_dataset(str(root)))


@pytest.mark.parametrize("names", [("ankle_boot", "ankle boot", "coat"), ("Bag", "bag", "coat")])
def test_folders_whose_names_read_as_one_class_are_refused_by_name(tmp_path, names):
    root = _folder(tmp_path / "data", names)
    message = _refused("both name class", lambda: load_dataset(str(root)))
    assert repr(names[0]) in message and repr(names[1]) in message


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = _folder(tmp_path / "data", ("bag", "coat", "dress"))
    for image in (root / "dress").iterdir():
        image.unlink()
    (root / "dress" / "notes.txt").write_text("no images here")
    _refused(f"class folder {root / 'dress'} has no images", lambda: load_dataset(str(root)))


def test_a_repeated_class_name_is_refused_by_line(tmp_path):
    root = _folder(tmp_path / "data", ("a", "b", "c"))
    (root / "classnames.txt").write_text("bag\ncoat\nbag\n")
    _refused("classnames.txt: line 1 and line 3 both name class 'bag'", lambda: load_dataset(str(root)))
    (root / "classnames.txt").unlink()
    names = tmp_path / "names.txt"
    names.write_text("bag\n\nBag\ncoat\n")
    _refused("names.txt: line 1 and line 3 both name class 'bag'",
             lambda: Labelled(str(root), classnames=str(names)).load())


def _labelled_csv(tmp_path, rows, name="labels.csv", separator=",", header="filepath,label", encoding="utf-8"):
    for file, _ in rows:
        if file and not (tmp_path / file).exists():
            _image(tmp_path / file)
    lines = [header] + [f"{file}{separator}{label}" for file, label in rows]
    (tmp_path / name).write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return tmp_path / name


def test_a_csv_row_with_an_empty_label_is_refused_by_line(tmp_path):
    path = _labelled_csv(tmp_path, [("a.png", "bag"), ("b.png", "coat"), ("c.png", " ")])
    _refused(f"{path}, line 4: empty 'label'", lambda: load_dataset(f"csv:{path}"))


def test_csv_labels_that_read_alike_are_refused(tmp_path):
    path = _labelled_csv(tmp_path, [("a.png", "bag"), ("b.png", "Bag"), ("c.png", "coat")])
    _refused("label 'Bag' and label 'bag' both name class 'Bag'", lambda: load_dataset(f"csv:{path}"))


# ------------------------------------------------------------------ text: UTF-8, BOM, rows
def _webdataset(root, samples, name="shard.tar"):
    """A tar of ``samples`` {key: {ext: bytes}}."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / name, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root / name


def _jpeg(value=90):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_latin1_text_files_are_refused_naming_the_file_and_line(tmp_path):
    root = _folder(tmp_path / "data", ("a", "b"))
    (root / "classnames.txt").write_bytes("bag\ncaf\xe9\n".encode("latin-1"))
    _refused(r"classnames.txt, line 2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8",
             lambda: load_dataset(str(root)))
    (root / "classnames.txt").unlink()
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_bytes("bag\ncaf\xe9\n".encode("latin-1"))
    _refused("names.txt, line 2: not UTF-8", lambda: Labelled(str(root), classnames=str(names)).load())
    templates.write_bytes("a photo of a {}.\nune photo d'un {} \xe0 Paris\n".encode("latin-1"))
    _refused("templates.txt, line 2: not UTF-8", lambda: Labelled(str(root), templates=str(templates)).load())
    labels = _labelled_csv(tmp_path, [("a.png", "bag"), ("b.png", "caf\xe9")], encoding="latin-1")
    _refused("labels.csv, line 3: not UTF-8", lambda: load_dataset(f"csv:{labels}"))
    pairs = _labelled_csv(tmp_path, [("a.png", "a bag"), ("b.png", "un caf\xe9")], "pairs.csv",
                          header="filepath,caption", encoding="latin-1")
    _refused("pairs.csv, line 3: not UTF-8", lambda: Captions(f"csv:{pairs}").load())
    shard = _webdataset(tmp_path / "wds", {"k0": {"jpg": _jpeg(), "txt": "caf\xe9".encode("latin-1")}})
    _refused(f"{shard}: caption k0.txt is not UTF-8 text", lambda: Captions(f"wds:{shard}").load())


def test_text_files_with_a_byte_order_mark_are_read(tmp_path):
    labels = _labelled_csv(tmp_path, [("a.png", "bag"), ("b.png", "coat")], encoding="utf-8-sig")
    assert load_dataset(f"csv:{labels}").classes == ("bag", "coat")
    root = _folder(tmp_path / "data", ("a", "b"))
    (root / "classnames.txt").write_bytes("bag\ncoat\n".encode("utf-8-sig"))
    assert load_dataset(str(root)).classes == ("bag", "coat")


@pytest.mark.parametrize("row, fields", [("c.png", 1), ("c.png,coat,extra", 3)])
def test_a_csv_row_with_another_field_count_is_refused_when_read(tmp_path, row, fields):
    _image(tmp_path / "c.png")
    path = _labelled_csv(tmp_path, [("a.png", "bag"), ("b.png", "coat")])
    path.write_text(path.read_text() + row + "\n\n")
    _refused(f"line 4: {fields} field\\(s\\) where the header has 2", lambda: load_dataset(f"csv:{path}"))
    pairs = _labelled_csv(tmp_path, [("a.png", "a bag")], "pairs.csv", header="filepath,caption")
    pairs.write_text(pairs.read_text() + row + "\n")
    _refused(f"pairs.csv, line 3: {fields} field", lambda: Captions(f"csv:{pairs}").load())


def test_an_empty_caption_is_refused_by_line(tmp_path):
    pairs = _labelled_csv(tmp_path, [("a.png", "a bag"), ("b.png", "")], "pairs.csv", header="filepath,caption")
    _refused(f"{pairs}, line 3: empty 'caption'", lambda: Captions(f"csv:{pairs}").load())
    # a pool reads only the image column: empty captions are fine there
    assert len(load_unlabelled(f"csv:{pairs}", 8)) == 2


def test_webdataset_samples_that_are_not_pairs_are_refused_by_shard_and_key(tmp_path):
    pair = {"jpg": _jpeg(), "txt": b"a bag"}
    shard = _webdataset(tmp_path / "wds", {"k0": pair, "k1": {"jpg": _jpeg()}, "k2": pair, "k3": {"jpg": _jpeg()}})
    _refused(f"{shard}: 2 of 4 samples have an image and no txt caption \\(first: k1\\)",
             lambda: Captions(f"wds:{shard}").load())
    assert len(load_unlabelled(f"wds:{shard}", 8)) == 4  # a pool needs no captions
    shard = _webdataset(tmp_path / "wds", {"k0": pair, "k1": {"bmp": b"BM", "txt": b"a coat"}}, "other.tar")
    _refused("1 of 2 samples have a txt caption and no image .* \\(first: k1\\)",
             lambda: Captions(f"wds:{shard}").load())
    shard = _webdataset(tmp_path / "wds", {"k0": pair, "k1": {"jpg": _jpeg(), "txt": b"  "}}, "empty.tar")
    _refused("an empty txt caption \\(first: k1\\)", lambda: Captions(f"wds:{shard}").load())


@pytest.mark.parametrize("template", ["a {} and a {}.", "a {braces} photo of a {}.", "a photo of a thing.", "{}}"])
def test_a_template_needs_exactly_one_brace_pair(tmp_path, template):
    root = _folder(tmp_path / "data")
    templates = tmp_path / "templates.txt"
    templates.write_text(f"a photo of a {{}}.\n{template}\n")
    _refused(f"templates.txt, line 2: template {template!r}".replace("{", "\\{").replace("}", "\\}").replace(".", "\\."),
             lambda: Labelled(str(root), templates=str(templates)).load())


def test_a_pool_folder_leaves_hidden_folders_out(tmp_path):
    root = _folder(tmp_path / "data")
    _image(root / ".ipynb_checkpoints" / "0.png")
    _image(root / "bag" / ".0.png")
    assert len(load_unlabelled(str(root), 8)) == 4


# ------------------------------------------------------------------ the CLI: TSV, synsets, no splits
def test_evaluate_reads_a_labelled_tsv_with_other_columns(tmp_path, model_dir, capsys):
    rows = [(f"{name}{i}.png", name) for name in ("bag", "coat") for i in range(2)]
    path = _labelled_csv(tmp_path, rows, "labels.tsv", separator="\t", header="image\tclass")
    base = ["evaluate", "--model", str(model_dir), "--dataset", f"csv:{path}", "--device", "cpu", "--workers", "0"]
    refused(capsys, base, "needs a header with columns 'filepath' and 'label' (separator ',')")
    out = tmp_path / "ca.json"
    assert main_ok(base + ["--csv-separator", "\t", "--csv-img-key", "image", "--csv-label-key", "class",
                           "--json", str(out)], capsys)
    record = json.loads(out.read_text())
    assert record["classes"] == ["bag", "coat"] and record["clean_accuracy"]["total"] == 4


def main_ok(argv, capsys) -> str:
    from clipguard.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_synset_folders_without_imagenet_are_refused_with_a_hint(tmp_path, capsys):
    root = _folder(tmp_path / "data", ("n01443537", "n01484850"))
    refused(capsys, ["evaluate", "--dataset", str(root), "--device", "cpu"], f"use --dataset imagenet:{root}")
    names = tmp_path / "names.txt"
    names.write_text("goldfish\nshark\n")
    assert Labelled(str(root), classnames=str(names)).load().classes == ("goldfish", "shark")
    (root / "classnames.txt").write_text("goldfish\nshark\n")
    assert load_dataset(str(root)).classes == ("goldfish", "shark")


def test_a_folder_without_splits_is_not_reported_as_the_test_split(tmp_path, model_dir, capsys):
    root = _folder(tmp_path / "data")
    out = tmp_path / "ca.json"
    printed = main_ok(["evaluate", "--model", str(model_dir), "--dataset", str(root), "--device", "cpu",
                       "--workers", "0", "--json", str(out)], capsys)
    record = json.loads(out.read_text())
    assert record["split"] is None and record["evaluated_on"] == "the whole dataset (it has no separate splits)"
    assert f"{root}/test" not in printed and "test split" not in printed and "(the whole dataset" in printed
