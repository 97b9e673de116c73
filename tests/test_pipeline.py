"""The Python API of the README: load, backdoor, defend, evaluate, save, on a tiny model."""

import json

import pytest

from clipguard import ClipguardError, pipeline
from clipguard.attacks import AttackConfig, save_backdoored
from clipguard.data import load_fmnist
from clipguard.engine import TrainConfig
from clipguard.models import save_clip

from conftest import TINY28, make_tiny_clip

TINY_ATTACK = AttackConfig(attack="badnet", target="bag", pairs=64, poison_rate=0.25,
                           train=TrainConfig(epochs=1, batch_size=16, warmup_steps=0, device="cpu"))


@pytest.fixture
def suspect_dir(tmp_path):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "clean")
    clip = pipeline.load_model(str(tmp_path / "clean"), device="cpu")
    suspect, trigger, record = pipeline.backdoor(clip, TINY_ATTACK)
    assert record["target"] == "bag" and suspect.config["attack"] is record
    save_backdoored(suspect, trigger, record, tmp_path / "suspect")
    return tmp_path / "suspect"


def test_the_readme_api_defends_evaluates_and_saves(tmp_path, suspect_dir):
    from clipguard.attacks import load_trigger

    suspect = pipeline.load_model(str(suspect_dir), device="cpu")
    trigger = load_trigger(suspect_dir, suspect.config["attack"])
    defended = pipeline.defend(suspect, "rvpt", shots=1, seed=0, device="cpu",
                               settings={"epochs": 1, "prompt_length": 2, "batch_size": 10})
    result = pipeline.evaluate(defended, trigger=trigger, target="bag", limit=50, progress=False)
    assert result["defense"] == "rvpt" and result["clean_accuracy"]["total"] == 50
    labels = load_fmnist("test").labels[:50]
    assert result["attack_success_rate"]["total"] == int((labels != result["classes"].index("bag")).sum())
    pipeline.save(defended, tmp_path / "d", evaluation=result)
    saved = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert saved["attack_success_rate"] == result["attack_success_rate"]
    again = pipeline.evaluate(pipeline.load_defended(suspect, tmp_path / "d"), trigger=trigger, target="bag",
                              limit=50, progress=False)
    assert again["attack_success_rate"] == result["attack_success_rate"]
    assert again["clean_accuracy"] == result["clean_accuracy"]


def test_no_defense_is_the_suspect_and_has_nothing_to_save(tmp_path, suspect_dir):
    suspect = pipeline.load_model(str(suspect_dir), device="cpu")
    defended = pipeline.defend(suspect, "none")
    assert defended.model is suspect and defended.stats["trainable_parameters"] == 0
    with pytest.raises(ClipguardError, match="nothing to save"):
        pipeline.save(defended, tmp_path / "d")


def test_a_pool_defense_without_a_pool_is_refused(suspect_dir):
    suspect = pipeline.load_model(str(suspect_dir), device="cpu")
    with pytest.raises(ClipguardError, match="needs an unlabelled pool"):
        pipeline.defend(suspect, "oracle-repair", device="cpu")


def test_defense_config_sets_shots_only_where_the_method_has_them():
    assert pipeline.defense_config("rvpt", seed=3, shots=4).shots == 4
    config = pipeline.defense_config("cleanclip", seed=3, shots=4, settings={"pairs": 10})
    assert (config.seed, config.pairs) == (3, 10) and not hasattr(config, "shots")


def test_the_attack_path_saves_the_model_with_its_evaluation(tmp_path):
    from clipguard.attacks import load_trigger
    from clipguard.eval.evaluate import metrics_of

    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "clean")
    clip = pipeline.load_model(str(tmp_path / "clean"), device="cpu")
    record, result = pipeline.attack(clip, TINY_ATTACK, tmp_path / "m")
    assert result["model"] == str(tmp_path / "m") and result["attack"]["target"] == "bag"
    assert json.loads((tmp_path / "m" / "eval.json").read_text()) == result
    saved = pipeline.load_model(str(tmp_path / "m"), device="cpu")
    assert saved.config["attack"]["evaluation"] == metrics_of(result) == record["evaluation"]
    again = pipeline.evaluate(saved, trigger=load_trigger(tmp_path / "m", record), target="bag", progress=False)
    assert metrics_of(again) == metrics_of(result)  # the saved model is the one evaluated


def test_an_attack_target_outside_the_attackers_classes_is_refused_before_any_work():
    with pytest.raises(ClipguardError, match="attacker's classes"):
        pipeline.check_attack_target(AttackConfig(target="cat"))
    pipeline.check_attack_target(AttackConfig(target="cat", poison_rate=0.0))  # a clean fine-tune has no target
