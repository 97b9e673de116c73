"""``attack --poison-rate 0``: the attack's fine-tune recipe on clean pairs, a control model (issue 32)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clipguard.attacks import AttackConfig, build_poisoned_pairs, build_trigger
from clipguard.attacks.poison import pair_sample
from clipguard.cli import main
from clipguard.data import load_fmnist
from clipguard.data.pairs import LabelledCorpus

from conftest import folder_of_test_images, refused

TINY_RECIPE = "pairs: 64\ntrain:\n  epochs: 1\n  batch_size: 32\n  warmup_steps: 0\n"


def _clean_finetune(tmp_path, model_dir, name, seed="3"):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE)
    out, folder = tmp_path / name, tmp_path / "eval"
    if not folder.exists():
        folder_of_test_images(folder, 2)  # a short evaluation
    assert main(["attack", "--model", str(model_dir), "--config", str(recipe), "--poison-rate", "0", "--seed", seed,
                 "--dataset", str(folder), "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_a_clean_finetune_is_recorded_clean_and_evaluates_without_an_asr(tmp_path, model_dir, capsys):
    out = _clean_finetune(tmp_path, model_dir, "ft-a")
    printed = capsys.readouterr().out.splitlines()[0]
    assert "clean fine-tune: 64 pairs, none poisoned" in printed and "ASR" not in printed
    config = json.loads((out / "config.json").read_text())
    assert "attack" not in config and not (out / "trigger.safetensors").exists()
    record = config["finetune"]
    assert record["clean"] is True and record["poison_rate"] == 0 and record["seed"] == 3
    assert record["steps"] == 2 and record["total_pairs"] == 64 and record["captions"] == "fmnist"
    assert "attack_success_rate" not in json.loads((out / "eval.json").read_text())
    result = tmp_path / "e.json"
    assert main(["evaluate", "--model", str(out), "--dataset", str(tmp_path / "eval"), "--json", str(result),
                 "--device", "cpu"]) == 0
    assert "attack_success_rate" not in json.loads(result.read_text())
    # the weights moved, and the same seed gives the same weights
    again = _clean_finetune(tmp_path, model_dir, "ft-b")
    tuned, base = load_file(str(out / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    assert all(torch.equal(tuned[k], v) for k, v in load_file(str(again / "model.safetensors")).items())


@pytest.mark.parametrize("flags", [["--attack", "sig"], ["--target", "coat"], ["--set", "amplitude=0.1"]])
def test_a_clean_finetune_refuses_trigger_flags_before_work(tmp_path, model_dir, capsys, flags):
    refused(capsys, ["attack", "--model", str(model_dir), "--poison-rate", "0", *flags, "--out", str(tmp_path / "ft")],
            "--poison-rate 0 is a clean fine-tune", flags[0])
    assert not (tmp_path / "ft").exists()


def test_bench_refuses_a_zero_poison_rate(tmp_path, capsys):
    refused(capsys, ["bench", "--set", "attack.poison_rate=0", "--out", str(tmp_path / "b")], "bench measures backdoors")


def test_a_clean_finetune_draws_the_pairs_its_attack_of_the_same_seed_draws():
    corpus = LabelledCorpus(load_fmnist("train"))
    config = AttackConfig(poison_rate=0.05, pairs=300, seed=4)
    attacked = build_poisoned_pairs(corpus, build_trigger("badnet", 28), config)
    clean = pair_sample(corpus, AttackConfig(poison_rate=0, pairs=300, seed=4))
    assert torch.equal(clean.images.labels, attacked.images.labels)
    assert AttackConfig(poison_rate=0, pairs=300).check().clean  # no "poisons no pair" refusal at rate 0
