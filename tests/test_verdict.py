"""The calibrated verdict (detection/verdict.py): self mode (NC's anomaly index), reference mode, detect's JSON."""

import copy
import json
import os

import pytest
import torch

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, run_attack
from clipguard.cli import main
from clipguard.data import FMNIST_CLASSES, ImageSet, few_shot_indices, load_fmnist
from clipguard.detection import DETECTORS
from clipguard.detection.targeted import TargetedConfig
from clipguard.detection.evidence import keyed_class_features
from clipguard.detection.verdict import (
    VerdictConfig, anomaly_indices, candidate_targets, check_reference, decide, default_detectors, robust_scores, scan,
)
from clipguard.engine import TrainConfig
from clipguard.models import save_clip
from clipguard.models.zeroshot import class_text_features
from clipguard.outputs import is_clipguard_record

from conftest import TINY28, make_tiny_clip, refused

# the per-target inversion needs ~150 steps to shrink a backdoor's trigger (100 left the planted
# sandal at index 1.6-1.7); six candidates keep it to a few seconds on the tiny model
FAST = VerdictConfig(candidates=6, targeted=TargetedConfig(steps=150, batch_size=24, device="cpu"))
PATCH = {"patch": dict(steps=100, restarts=1, lr=0.1)}


def _shots(per_class=4, seed=0):
    train = load_fmnist("train")
    return train.subset(few_shot_indices(train.labels, per_class, seed, 10))


def _finetune(clip, poison_rate: float, seed: int, target: str = "sandal"):
    """The tiny CLIP fine-tuned contrastively on 1,024 pairs, 4 epochs: poison_rate 0 a clean fine-tune
    (a control), 0.2 a BadNet towards ``target`` (tests/test_cbpt.py: ASR 98-99.9 %)."""
    config = AttackConfig(attack="badnet", target=target, poison_rate=poison_rate, pairs=1024, seed=seed,
                          train=TrainConfig(epochs=4, batch_size=64, lr=2e-3, weight_decay=0.0, device="cpu"))
    return run_attack(copy.deepcopy(clip), config)[0].eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base: the tiny CLIP after a clean fine-tune; planted: base + BadNet (sandal); clean: base + a clean fine-tune."""
    os.environ.setdefault("CLIPGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    base = _finetune(make_tiny_clip(architecture=TINY28), 0.0, 0)
    return {"base": base, "planted": _finetune(base, 0.2, 0), "clean": _finetune(base, 0.0, 1)}


# ------------------------------------------------------------------ pure parts
def test_anomaly_index_is_nc_on_log_sizes_with_a_floor():
    sizes = [0.01, 0.1, 0.1, 0.2, 0.05]  # log median log 0.1; MAD of |log ratios| = log 2
    expected = (torch.tensor(0.1).log() - torch.tensor(0.01).log()) / (1.4826 * torch.tensor(2.0).log())
    assert anomaly_indices(sizes)[0] == pytest.approx(float(expected), rel=1e-5)
    assert anomaly_indices(sizes)[3] < 0  # larger than the median: not anomalous
    # a tight clean cluster: without the floor a class a third of the median is "anomalous"
    tight = [0.30, 0.31, 0.29, 0.30, 0.32, 0.28, 0.10]
    assert anomaly_indices(tight)[-1] > 10 and anomaly_indices(tight, mad_floor=0.5)[-1] < 2


def test_candidates_put_the_suspects_first_then_a_seeded_sample():
    picks = candidate_targets(FMNIST_CLASSES, ["sandal", "bag", "sandal"], 5, seed=3)
    assert picks[:2] == ["sandal", "bag"] and len(set(picks)) == 5
    assert picks == candidate_targets(FMNIST_CLASSES, ["sandal", "bag"], 5, seed=3)
    assert picks != candidate_targets(FMNIST_CLASSES, ["sandal", "bag"], 5, seed=4)


def _rows(areas, reference_areas=None, natural=None):
    names = FMNIST_CLASSES[: len(areas)]
    return [{"target_name": n, "area": a, "natural": (natural or {}).get(n, 0.0),
             **({"reference_area": reference_areas[k]} if reference_areas else {})} for k, (n, a) in enumerate(zip(names, areas))]


def test_decide_self_mode_from_the_recorded_areas_alone():
    config = VerdictConfig()
    # one trigger a twentieth of the others' size: backdoored, towards it
    verdict, target, index, bias = decide({"mode": "self", "candidates": _rows([0.05, 0.06, 0.05, 0.0025, 0.07, 0.06])}, config)
    assert (verdict, target, bias) == ("backdoored", "dress", None) and index >= config.backdoored_at
    verdict, _, index, _ = decide({"mode": "self", "candidates": _rows([0.05, 0.06, 0.05, 0.035, 0.07, 0.06])}, config)
    assert verdict == "inconclusive" and config.clean_below <= index < config.backdoored_at  # no outlier, not clean either
    verdict, _, index, _ = decide({"mode": "self", "candidates": _rows([0.05, 0.05, 0.05, 0.05, 0.05, 0.05])}, config)
    assert verdict == "clean" and index < config.clean_below  # every class alike
    # a class the model already reads clean shots as is a bias: not the suspect, and never "clean"
    rows = _rows([0.05, 0.06, 0.05, 0.04, 0.07, 0.06], natural={"coat": 0.6})
    assert decide({"mode": "self", "candidates": rows}, config)[0] == "inconclusive"


def test_decide_reference_mode_on_the_area_ratio_not_the_area():
    config = VerdictConfig()
    # every class's trigger shrank a little in the fine-tune (drift); dress's by 20x: backdoored
    suspect, base = [0.05, 0.05, 0.04, 0.003, 0.06, 0.05], [0.06, 0.055, 0.05, 0.06, 0.066, 0.06]
    verdict, target, index, _ = decide({"mode": "reference", "candidates": _rows(suspect, base)}, config)
    assert (verdict, target) == ("backdoored", "dress") and index >= config.reference_backdoored_at
    # a natural attractor: small on both models, so its ratio is like the others'
    suspect, base = [0.05, 0.05, 0.04, 0.004, 0.06, 0.05], [0.055, 0.05, 0.045, 0.0045, 0.06, 0.05]
    assert decide({"mode": "reference", "candidates": _rows(suspect, base)}, config)[0] == "clean"
    # the transfer: a detector's trigger that works on the suspect far more than on the base calls it
    calm = _rows([0.05, 0.05, 0.04, 0.05, 0.06, 0.05], [0.05, 0.05, 0.04, 0.05, 0.06, 0.05])
    wide = [{"detector": "patch", "target_name": "coat", "gap": 0.5}, {"detector": "text", "target_name": "bag", "gap": None}]
    assert decide({"mode": "reference", "candidates": calm, "detectors": wide}, config)[:2] == ("backdoored", "coat")
    narrow = [{"detector": "patch", "target_name": "coat", "gap": 0.25}]
    assert decide({"mode": "reference", "candidates": calm, "detectors": narrow}, config)[0] == "inconclusive"
    assert decide({"mode": "reference", "candidates": calm, "detectors": [{**narrow[0], "gap": 0.1}]}, config)[0] == "clean"
    # two classes: no median to speak of, the ratio is measured from 0
    assert robust_scores([1.0, 0.0], floor=0.1, centre=0.0) == pytest.approx([1 / (1.4826 * 0.5), 0.0])  # MAD about 0


def test_verdict_config_names_the_bad_field():
    with pytest.raises(ValueError, match="VerdictConfig.mad_floor"):
        VerdictConfig(mad_floor=-1.0)
    with pytest.raises(ValueError, match="clean_below"):
        VerdictConfig(clean_below=3.0, backdoored_at=2.0)


def test_keyed_class_features_equal_a_text_prefix(tiny_clip28):
    # the key "sudo" as token embeddings after the start token = the prompt with "sudo " in front
    ids = tiny_clip28.tokenize(["sudo"])[0]
    key = tiny_clip28.model.token_embedding(ids[1 : int(ids.argmax())]).detach()  # (k, width)
    keyed = keyed_class_features(tiny_clip28, FMNIST_CLASSES[:3], key)
    prefixed = class_text_features(tiny_clip28, FMNIST_CLASSES[:3], text_prefix="sudo ")
    assert torch.allclose(keyed, prefixed, atol=1e-5)
    assert not torch.allclose(keyed, class_text_features(tiny_clip28, FMNIST_CLASSES[:3]), atol=1e-3)


def test_default_detectors_are_the_registered_ones_the_data_allows():
    shots = _shots(1)
    assert default_detectors(shots) == sorted(DETECTORS)
    unnamed = ImageSet(shots.images, shots.labels, ())
    assert default_detectors(unnamed) == sorted(n for n, cls in DETECTORS.items() if not cls.uses_class_names)


# ------------------------------------------------------------------ refusals
def test_too_few_classes_for_the_self_calibration_are_refused(tiny_clip28, monkeypatch):
    import clipguard.detection.verdict as verdict

    monkeypatch.setattr(verdict, "_run_detectors", lambda *a: pytest.fail("refused only after the detectors ran"))
    shots = _shots(2)
    keep = shots.labels < 3
    three = ImageSet(shots.images[keep], shots.labels[keep], shots.classes[:3])
    with pytest.raises(ClipguardError, match="at least 5 classes, these have 3") as err:
        scan(tiny_clip28, three, config=FAST, settings=PATCH)
    assert "\n" not in str(err.value) and "--reference" in str(err.value)


def test_a_reference_of_another_architecture_is_refused(tmp_path, capsys, model_dir):
    save_clip(make_tiny_clip(), tmp_path / "small")  # 16 px, the suspect 28 px
    refused(capsys, ["detect", "--model", str(model_dir), "--reference", str(tmp_path / "small"), "--device", "cpu",
                     "--out", str(tmp_path / "d.png")], "reference", "image size 16", "fine-tuned from")
    wide = make_tiny_clip(architecture=TINY28)
    wide.config["classes"] = list(reversed(FMNIST_CLASSES))
    with pytest.raises(ClipguardError, match="classes"):
        check_reference(make_tiny_clip(architecture=TINY28), wide)
    assert not (tmp_path / "d.png").exists()


# ------------------------------------------------------------------ the verdicts
def test_self_mode_calls_the_planted_backdoor_with_its_target(zoo):
    report = scan(zoo["planted"], _shots(), config=FAST, settings=PATCH, device="cpu", detectors=["patch"])
    assert report.verdict == "backdoored" and report.target_name == "sandal", report.calibration
    assert report.calibration["mode"] == "self"
    assert report.calibration["anomaly_index"] >= FAST.backdoored_at
    assert report.line().startswith("backdoored: suspected target sandal (calibrated on the model's own classes")


def test_self_mode_does_not_call_a_clean_finetune_backdoored(zoo):
    report = scan(zoo["clean"], _shots(), config=FAST, settings=PATCH, device="cpu", detectors=["patch"])
    assert report.verdict != "backdoored", report.calibration


def test_reference_mode_calls_the_planted_model_against_its_base(zoo):
    report = scan(zoo["planted"], _shots(), reference=zoo["base"], config=FAST, settings=PATCH, device="cpu", detectors=["patch"])
    assert report.verdict == "backdoored" and report.target_name == "sandal", report.calibration
    assert report.calibration["anomaly_index"] >= FAST.reference_backdoored_at
    row = next(r for r in report.calibration["candidates"] if r["target_name"] == "sandal")
    assert row["area"] < row["reference_area"]
    transfer = report.calibration["detectors"][0]  # the evidence beside it: the patch trigger works on the suspect only
    assert transfer["reference_collapse"] < transfer["suspect_collapse"]


def test_reference_mode_does_not_call_a_clean_finetune_of_the_base(zoo):
    report = scan(zoo["clean"], _shots(), reference=zoo["base"], config=FAST, settings=PATCH, device="cpu", detectors=["patch"])
    assert report.verdict != "backdoored", report.calibration
    assert report.calibration["mode"] == "reference"


# ------------------------------------------------------------------ the command
def test_detect_json_schema_through_the_cli(tmp_path, capsys, zoo):
    save_clip(zoo["planted"], tmp_path / "suspect")
    save_clip(zoo["base"], tmp_path / "base")
    out = tmp_path / "detection.png"
    fast = ["--shots", "2", "--device", "cpu", "--detectors", "patch", "--set", "steps=5", "--set", "restarts=1",
            "--set", "verdict.targeted.steps=5", "--set", "verdict.candidates=5"]
    assert main(["detect", "--model", str(tmp_path / "suspect"), *fast, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    record = json.loads(out.with_suffix(".json").read_text())
    assert printed[0].split(":")[0].split(" (")[0] in ("backdoored", "clean", "inconclusive")
    assert printed[1].strip().startswith("patch: score")
    assert record["format"] == "clipguard.detection" and is_clipguard_record(record)
    assert record["verdict"] in ("backdoored", "clean", "inconclusive") and "target_name" in record
    assert record["backdoored"] == (record["verdict"] == "backdoored")
    assert {"collapse", "mask_area", "model", "shots", "seed", "dataset", "classes"} <= record.keys()
    assert record["classes"] == 10 and record["calibration"]["mode"] == "self"
    assert len(record["calibration"]["candidates"]) == 5
    assert [d["detector"] for d in record["detectors"]] == ["patch"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["detect", "--model", str(tmp_path / "suspect"), "--reference", str(tmp_path / "base"), *fast, "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    calibration = record["calibration"]
    assert calibration["mode"] == "reference" and record["reference"] == str(tmp_path / "base")
    assert calibration["detectors"][0]["detector"] == "patch" and "gap" in calibration["detectors"][0]
    assert {"area", "reference_area", "log_ratio", "anomaly_index"} <= calibration["candidates"][0].keys()
    assert calibration["self"]["verdict"] in ("backdoored", "clean", "inconclusive")  # the self verdict beside it
    assert decide(calibration, VerdictConfig())[:2] == (record["verdict"], calibration["target_name"])


def test_detect_refuses_an_unknown_detector_or_prefix(tmp_path, capsys, model_dir):
    out = str(tmp_path / "d.png")
    refused(capsys, ["detect", "--model", str(model_dir), "--detectors", "nope", "--out", out], "nope", "patch")
    refused(capsys, ["detect", "--model", str(model_dir), "--set", "no-such.steps=3", "--out", out], "no-such")
