import dataclasses
import json
from pathlib import Path

import pytest
import torch

from clipguard.engine import TrainConfig
from clipguard.eval.evaluate import evaluate_model
from clipguard.models import load_clip
from clipguard.models.builtin import BuiltinRecipe, train_builtin
from clipguard.models.loading import BUILTIN_DIR, BUILTIN_MODELS

from conftest import TINY28


def test_shipped_builtin_model_reaches_85_percent_on_a_fixed_test_subset():
    clip = load_clip("builtin")
    record = evaluate_model(clip, "builtin", limit=2000, progress=False)
    assert record["clean_accuracy"]["total"] == 2000
    assert record["clean_accuracy"]["value"] >= 0.85


def test_shipped_broad_model_reaches_85_percent_on_held_out_validation_images():
    clip = load_clip("builtin-broad")
    assert clip.config["train_recipe"]["corpus"] == "fmnist+web"
    record = evaluate_model(clip, "builtin-broad", dataset="fmnist-val", limit=2000, progress=False)
    assert record["clean_accuracy"]["total"] == 2000
    assert record["clean_accuracy"]["value"] >= 0.85


@pytest.mark.parametrize("spec", sorted(BUILTIN_MODELS))
def test_shipped_weights_are_small_checksummed_fp16_safetensors(spec):
    directory = BUILTIN_MODELS[spec][0]
    weights = directory / "model.safetensors"
    assert weights.stat().st_size <= 30 * 2**20
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("visual.proj").dtype == torch.float16
    assert "model.safetensors" in json.loads((directory / "config.json").read_text())["files"]


def test_the_package_data_ships_every_builtin_model():
    import tomllib
    from fnmatch import fnmatch

    patterns = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["clipguard"]
    package = BUILTIN_DIR.parents[2]  # src/clipguard
    for directory, _ in BUILTIN_MODELS.values():
        for name in ("config.json", "model.safetensors"):
            relative = (directory / name).relative_to(package).as_posix()
            assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def _tiny_recipe(seed):
    train = TrainConfig(epochs=1, batch_size=64, lr=1e-3, seed=seed, device="cpu", warmup_steps=2)
    return BuiltinRecipe(architecture=TINY28, train=train, train_images=256)


def test_train_builtin_recipe_is_deterministic_under_its_seed():
    weights = []
    for seed in (0, 0, 1):
        clip, result = train_builtin(_tiny_recipe(seed))
        assert result.steps == 4
        weights.append(clip.model.visual.proj.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert clip.config["train_recipe"]["train"]["seed"] == 1


def test_recipe_rejects_bad_values_by_field_name():
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(TINY28, patch_size=5)
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=0)


def test_the_broad_corpus_adds_the_web_renderings_of_the_same_images():
    recipe = dataclasses.replace(_tiny_recipe(0), corpus="fmnist+web")
    clip, result = train_builtin(recipe)
    assert result.steps == 8  # 256 plain + 256 rendered pairs at batch 64
    assert clip.config["train_recipe"]["corpus"] == "fmnist+web"
    with pytest.raises(ValueError, match="corpus 'web'"):
        dataclasses.replace(recipe, corpus="web")
