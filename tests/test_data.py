import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard import ClipguardError
from clipguard.data import few_shot_indices, load_caption_csv, load_fmnist, load_image_folder
from clipguard.data.fmnist import FMNIST_CLASSES


def test_fmnist_test_split_shape_and_classes():
    test = load_fmnist("test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    batch = test.float_images(slice(0, 5))
    assert batch.shape == (5, 3, 28, 28) and 0 <= batch.min() and batch.max() <= 1
    assert test.classes == FMNIST_CLASSES


def test_missing_fmnist_names_the_debian_package(tmp_path):
    with pytest.raises(ClipguardError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist("test", root=str(tmp_path))


def test_corrupt_idx_file_is_refused(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"not an idx file")
    with pytest.raises(ClipguardError, match="not an unsigned-byte IDX"):
        load_fmnist("test", root=str(tmp_path))


def test_few_shot_sampler_is_seeded_and_balanced():
    labels = torch.arange(10).repeat(20)
    a = few_shot_indices(labels, shots=4, seed=3)
    assert torch.equal(a, few_shot_indices(labels, shots=4, seed=3))
    assert not torch.equal(a, few_shot_indices(labels, shots=4, seed=4))
    assert torch.bincount(labels[a]).tolist() == [4] * 10
    with pytest.raises(ClipguardError, match="fewer than --shots"):
        few_shot_indices(labels, shots=21, seed=0)


def _png(path, value):
    Image.fromarray(np.full((20, 30, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_and_caption_csv(tmp_path):
    for cls, value in (("cat", 10), ("dog_house", 200)):
        (tmp_path / cls).mkdir()
        _png(tmp_path / cls / "a.png", value)
    folder = load_image_folder(tmp_path, size=16)
    assert folder.classes == ("cat", "dog house")
    assert folder.float_images().shape == (2, 3, 16, 16) and folder.labels.tolist() == [0, 1]
    (tmp_path / "pairs.csv").write_text("filepath,caption\ncat/a.png,a cat\ndog_house/a.png,a dog house\n")
    pairs = load_caption_csv(tmp_path / "pairs.csv", size=8)
    assert pairs.float_images(torch.arange(2)).shape == (2, 3, 8, 8)
    assert [pairs.caption(i) for i in range(2)] == ["a cat", "a dog house"]


def test_corrupt_image_gives_one_line_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "dog").mkdir()
    _png(tmp_path / "dog" / "good.png", 10)
    folder = load_image_folder(tmp_path, size=16)  # listed, not decoded
    with pytest.raises(ClipguardError, match="cannot read image .*bad.png") as err:
        folder.float_images()
    assert "\n" not in str(err.value)


def test_caption_csv_needs_its_columns(tmp_path):
    (tmp_path / "x.csv").write_text("path,text\na.png,hi\n")
    with pytest.raises(ClipguardError, match="'filepath' and 'caption'"):
        load_caption_csv(tmp_path / "x.csv", size=8)


def test_image_folder_names_classes_from_classnames_txt_and_needs_two_classes(tmp_path):
    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        _png(tmp_path / cls / "a.png", 50)
    (tmp_path / "classnames.txt").write_text("goldfish\ngreat white shark\n")
    assert load_image_folder(tmp_path, size=8).classes == ("goldfish", "great white shark")
    (tmp_path / "classnames.txt").write_text("goldfish\n")
    with pytest.raises(ClipguardError, match="names 1 classes but .* has 2"):
        load_image_folder(tmp_path, size=8)
    (tmp_path / "classnames.txt").unlink()
    (tmp_path / "n02" / "a.png").unlink()
    with pytest.raises(ClipguardError, match="n02 has no images"):  # an empty class folder is refused by name
        load_image_folder(tmp_path, size=8)
    (tmp_path / "n02").rmdir()
    with pytest.raises(ClipguardError, match="one class only"):
        load_image_folder(tmp_path, size=8)


def test_image_folder_decodes_only_what_a_subset_asks_for(tmp_path, monkeypatch):
    from clipguard.data import folders

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(20):
            _png(tmp_path / cls / f"{i:02d}.png", 10 * i)
    decoded = []
    real = folders.read_image
    monkeypatch.setattr(folders, "read_image",
                        lambda path, size, fit="crop": decoded.append(path) or real(path, size, fit))
    folder = load_image_folder(tmp_path, size=8)
    assert len(folder) == 40 and decoded == []  # listing decodes nothing
    shots = folder.subset(few_shot_indices(folder.labels, 2, 0, 2))
    assert shots.float_images().shape == (4, 3, 8, 8) and len(decoded) == 4
    assert torch.equal(shots.labels, folder.labels[few_shot_indices(folder.labels, 2, 0, 2)])


def test_the_web_corpus_renders_train_items_and_the_validation_split_is_disjoint():
    from clipguard.data import Captions, load_dataset
    from clipguard.data.web import BACKGROUNDS, COLOURS, CORPUS_IMAGES

    web = Captions("fmnist-web").load()
    assert len(web) == CORPUS_IMAGES and web.labels is None
    first = web.subset(torch.arange(6))
    images = first.float_images(torch.arange(6))
    assert images.shape == (6, 3, 28, 28) and torch.equal(images, web.float_images(torch.arange(6)))  # fixed pairs
    assert images.std(dim=(1, 2, 3)).min() > 0.05 and not torch.equal(images[:, 0], images[:, 1])  # coloured
    for caption in first.captions:
        assert any(c in caption for c in COLOURS) and any(f"{b}" in caption for b in BACKGROUNDS) or "photo" in caption
    val, shots_from = load_dataset("fmnist-val", "test"), load_dataset("fmnist-val", "train")
    train = load_fmnist("train")
    assert len(val) == 5000 and len(shots_from) == CORPUS_IMAGES
    assert torch.equal(val.images, train.images[CORPUS_IMAGES:]) and torch.equal(shots_from.images, train.images[:CORPUS_IMAGES])


def test_a_web_corpus_with_a_plain_share_keeps_the_other_renderings():
    from clipguard.data import Captions
    from clipguard.data.web import PLAIN_FORMS

    web, mixed = (Captions(spec).load().subset(torch.arange(200)) for spec in ("fmnist-web", "fmnist-web:plain=0.3"))
    train = load_fmnist("train")
    names = [train.classes[int(label)] for label in train.labels[:200]]
    plain = torch.tensor([mixed.captions[i] in {form.format(x=names[i]) for form in PLAIN_FORMS} for i in range(200)])
    assert 40 <= int(plain.sum()) <= 80  # about 30 % of 200
    for i in torch.nonzero(plain).flatten()[:5].tolist():  # a plain pair is the grey train image itself
        assert torch.equal(mixed.decode(i), train.images[i].expand(3, 28, 28))
    kept = torch.nonzero(~plain).flatten()[:5].tolist()
    assert [mixed.captions[i] for i in kept] == [web.captions[i] for i in kept]
    assert all(torch.equal(mixed.decode(i), web.decode(i)) for i in kept)
    for bad in ("fmnist-web:plain=1.5", "fmnist-web:plain=x", "fmnist-web:mixed=0.3"):
        with pytest.raises(ClipguardError, match="fmnist-web:plain=P"):
            Captions(bad).check()


def test_each_spec_kind_is_one_class_that_knows_its_splits(tmp_path):
    import pytest

    from clipguard import ClipguardError
    from clipguard.data import Captions, Labelled
    from clipguard.data.kinds import (
        CsvImages, CsvPairs, FmnistImages, FmnistPairs, FmnistValImages, ImageFolder, ImagenetFolder, WdsPairs, WebPairs,
    )

    (tmp_path / "flat" / "cat").mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / "split" / split / "cat").mkdir(parents=True)
    kinds = {"fmnist": FmnistImages, "fmnist-val": FmnistValImages, "csv:x.csv": CsvImages,
             f"imagenet:{tmp_path / 'split'}": ImagenetFolder, str(tmp_path / "flat"): ImageFolder}
    assert {spec: type(Labelled(spec).kind) for spec in kinds} == kinds
    assert Labelled(str(tmp_path / "split")).splits() == ("train", "test") and Labelled("fmnist-val").has_splits
    assert Labelled(str(tmp_path / "flat")).splits() == () and not Labelled("csv:x.csv").has_splits
    assert Labelled("csv:x.csv", csv_separator="\t").read_options() == ["\t", "filepath", "label"]
    assert Labelled("csv:x.csv").read_options() == [] and Labelled("fmnist").read_options() == []
    captions = {"fmnist": FmnistPairs, "fmnist-web:plain=0.7": WebPairs, "csv:p.csv": CsvPairs, "wds:a.tar": WdsPairs}
    assert {spec: type(Captions(spec).kind) for spec in captions} == captions
    assert Captions("fmnist-web").builtin and not Captions("wds:a.tar").builtin
    with pytest.raises(ClipguardError, match="expected fmnist, fmnist-web"):
        Captions("parquet:x").kind
    from clipguard.data.kinds import CsvPool, FmnistPool, FolderPool, WdsPool, pool_kind

    pools = {"fmnist": FmnistPool, "csv:p.csv": CsvPool, "wds:a.tar": WdsPool, "imagenet:d": FolderPool, "d": FolderPool}
    assert {spec: type(pool_kind(spec, Captions())) for spec in pools} == pools
