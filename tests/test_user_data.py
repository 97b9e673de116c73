"""A user's own labelled images through defend, evaluate and detect (an ImageFolder, with or
without train/ and val/ splits)."""

import json

from clipguard.cli import main
from clipguard.data import FMNIST_CLASSES, load_dataset
from clipguard.models import save_clip

from conftest import TINY28, make_tiny_clip
from test_bad_inputs import _folder_of_test_images

PROBE = ["--method", "linear-probe", "--shots", "2", "--set", "epochs=1", "--device", "cpu"]


def test_defend_on_a_folder_without_splits_evaluates_on_the_images_not_drawn_as_shots(tmp_path, capsys):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    folder = _folder_of_test_images(tmp_path / "folder", per_class=6)
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
    _folder_of_test_images(tmp_path / "data" / "train", per_class=3)
    _folder_of_test_images(tmp_path / "data" / "val", per_class=2)
    assert main(["defend", "--model", str(tmp_path / "m"), *PROBE, "--dataset", str(tmp_path / "data"),
                 "--out", str(tmp_path / "d")]) == 0
    record = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert record["clean_accuracy"]["total"] == 20 and record["evaluated_on"] == "the test split"


def test_detect_draws_its_shots_from_a_folder(tmp_path, capsys):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    folder = _folder_of_test_images(tmp_path / "folder", per_class=3)
    assert main(["detect", "--model", str(tmp_path / "m"), "--dataset", str(folder), "--shots", "2", "--device",
                 "cpu", "--set", "steps=2", "--set", "restarts=1", "--out", str(tmp_path / "det.png")]) == 0
    result = json.loads((tmp_path / "det.json").read_text())
    assert result["target_name"] in sorted(FMNIST_CLASSES)
