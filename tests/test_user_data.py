"""A user's own labelled images through defend, evaluate and detect (an ImageFolder, with or
without train/ and val/ splits)."""

import json

import torch

from clipguard.cli import main
from clipguard.data import FMNIST_CLASSES, load_dataset
from clipguard.models import save_clip

from conftest import TINY28, folder_of_test_images, make_tiny_clip

PROBE = ["--method", "linear-probe", "--shots", "2", "--set", "epochs=1", "--device", "cpu"]


def test_defend_on_a_folder_without_splits_evaluates_on_the_images_not_drawn_as_shots(tmp_path, capsys):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    folder = folder_of_test_images(tmp_path / "folder", per_class=6)
    assert main(["defend", "--model", str(tmp_path / "m"), *PROBE, "--dataset", str(folder),
                 "--out", str(tmp_path / "d")]) == 0
    assert "the 40 images not drawn as shots" in capsys.readouterr().out
    record = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert record["clean_accuracy"]["total"] == 60 - 10 * 2
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert saved["class_names"] == list(load_dataset(str(folder)).classes) == sorted(FMNIST_CLASSES)
    # the defense is learned for the folder's class list, by name: evaluate accepts it on that folder
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--defense", str(tmp_path / "d"), "--dataset",
                 str(folder), "--device", "cpu"]) == 0
    assert "through linear-probe" in capsys.readouterr().out


def test_defend_on_a_folder_with_splits_draws_from_train_and_evaluates_on_val(tmp_path):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    folder_of_test_images(tmp_path / "data" / "train", per_class=3)
    folder_of_test_images(tmp_path / "data" / "val", per_class=2)
    assert main(["defend", "--model", str(tmp_path / "m"), *PROBE, "--dataset", str(tmp_path / "data"),
                 "--out", str(tmp_path / "d")]) == 0
    record = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert record["clean_accuracy"]["total"] == 20 and record["evaluated_on"] == "the test split"


def test_detect_draws_its_shots_from_a_folder(tmp_path, capsys):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    folder = folder_of_test_images(tmp_path / "folder", per_class=3)
    assert main(["detect", "--model", str(tmp_path / "m"), "--dataset", str(folder), "--shots", "2", "--device",
                 "cpu", "--set", "steps=2", "--set", "restarts=1", "--detectors", "patch",
                 "--set", "verdict.targeted.steps=2", "--out", str(tmp_path / "det.png")]) == 0
    result = json.loads((tmp_path / "det.json").read_text())
    assert result["classes"] == 10 and result["detectors"][0]["target_name"] in sorted(FMNIST_CLASSES)


def _pngs(folder, count, value=60):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((20, 20, 3), value + i, dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagenet_synset_folders_are_named_by_id_with_openai_templates(tmp_path):
    import pytest

    from clipguard import ClipguardError

    # a subset of the 1,000 synsets: goldfish (class 1) and great white shark (class 2), not tench (0)
    for synset in ("n01443537", "n01484850"):
        _pngs(tmp_path / "val" / synset, 2)
        _pngs(tmp_path / "train" / synset, 3)
    images = load_dataset(f"imagenet:{tmp_path}", "test", 16)
    assert images.classes == ("goldfish", "great white shark") and len(images) == 4
    assert len(images.templates) == 80 and images.templates[0] == "a bad photo of a {}."
    assert len(load_dataset(f"imagenet:{tmp_path}", "train", 16)) == 6
    from clipguard.eval.evaluate import evaluate_model
    from clipguard.models.zeroshot import class_text_features

    clip = make_tiny_clip(architecture=TINY28)
    record = evaluate_model(clip, "tiny", f"imagenet:{tmp_path}", progress=False)
    assert record["classes"] == ["goldfish", "great white shark"] and record["clean_accuracy"]["total"] == 4
    openai = class_text_features(clip, images.classes, images.templates)
    assert not torch.allclose(openai, class_text_features(clip, images.classes))  # the 80 templates are used
    import clipguard.models.zeroshot as zeroshot

    batches = []
    encode = clip.encode_text
    with pytest.MonkeyPatch.context() as patch:  # 2 classes x 80 templates through the text tower a class at a time
        patch.setattr(zeroshot, "TEXT_CHUNK", 100)
        patch.setattr(clip, "encode_text", lambda ids, **kw: batches.append(len(ids)) or encode(ids, **kw))
        assert torch.allclose(class_text_features(clip, images.classes, images.templates), openai, atol=1e-6)
    assert batches == [80, 80]
    _pngs(tmp_path / "val" / "n99999999", 1)
    with pytest.raises(ClipguardError, match="'n99999999' is not one of the 1,000 ImageNet synset IDs"):
        load_dataset(f"imagenet:{tmp_path}", "test", 16)


def test_a_labelled_csv_is_a_dataset_spec(tmp_path, capsys):
    import pytest

    from clipguard import ClipguardError

    _pngs(tmp_path / "img", 6)
    rows = "".join(f"img/{i}.png,{'bag' if i % 2 else 'sandal'}\n" for i in range(6))
    (tmp_path / "data.csv").write_text("filepath,label\n" + rows)
    images = load_dataset(f"csv:{tmp_path / 'data.csv'}", "test", 28)
    assert images.classes == ("bag", "sandal") and images.labels.tolist() == [1, 0, 1, 0, 1, 0]
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", f"csv:{tmp_path / 'data.csv'}",
                 "--attack", "badnet", "--target", "bag", "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["clean_accuracy"]["total"] == 6 and record["attack_success_rate"]["total"] == 3
    (tmp_path / "bad.csv").write_text("path,class\nimg/0.png,bag\n")
    with pytest.raises(ClipguardError, match="'filepath' and 'label'"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}", "test", 28)
