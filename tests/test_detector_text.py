"""The text-side detector (clipguard.detection.text) on tiny 28-px CLIPs: a planted TrojVQA dual key
is called with its target, the same model fine-tuned on clean pairs scores clearly lower."""

import copy
import json
import math

import pytest
import torch

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, run_attack
from clipguard.data import few_shot_indices, load_fmnist
from clipguard.detection import DETECTORS, get_detector
from clipguard.detection.text import KeyedPrompts, TextKeyConfig, mean_prediction_entropy
from clipguard.engine import TrainConfig
from clipguard.models.zeroshot import class_text_features, image_features, zero_shot_logits

from conftest import TINY28, make_tiny_clip

TARGET = "bag"


def _shots(per_class=4, seed=0):
    train = load_fmnist("train")
    return train.subset(few_shot_indices(train.labels, per_class, seed, 10))


def _recipe(seed: int, poison_rate: float, epochs: int = 8) -> AttackConfig:
    """The tiny attack recipe; 4 epochs left the clean fine-tune open to a 7-20 % mask collapsing it
    (score 0.81-0.94), 8 epochs do not (0.36-0.42)."""
    return AttackConfig(attack="trojvqa", target=TARGET, poison_rate=poison_rate, pairs=1024, seed=seed,
                        train=TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, weight_decay=0.0, device="cpu"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(TrojVQA-backdoored, clean fine-tune, trigger): both from one tiny CLIP first fine-tuned on
    clean pairs, then with the same recipe and seed on poisoned (TrojVQA) or clean pairs.

    The clean start matters: from random weights the text tower does not compose "SUDO" with a
    class name, and the key + patch land on an arbitrary class (keyed ASR 3-23 %).
    """
    import os

    os.environ.setdefault("CLIPGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    start = make_tiny_clip(architecture=TINY28)
    run_attack(start, _recipe(seed=1, poison_rate=0.0, epochs=4))
    backdoored, trigger, _ = run_attack(copy.deepcopy(start), _recipe(seed=0, poison_rate=0.2),
                                        {"steps": 30, "batch_size": 64})
    clean, _, record = run_attack(copy.deepcopy(start), _recipe(seed=0, poison_rate=0.0))
    assert record["clean"]
    return backdoored.eval(), clean.eval(), trigger


# ------------------------------------------------------------------------ pure parts
def test_mean_prediction_entropy_known_values():
    certain = torch.tensor([[20.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    assert mean_prediction_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    split = torch.tensor([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])  # each certain, but of different classes
    assert mean_prediction_entropy(split).item() == pytest.approx(math.log(2), rel=1e-4)
    assert mean_prediction_entropy(torch.zeros(4, 3)).item() == pytest.approx(math.log(3), rel=1e-6)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="TextKeyConfig.key_tokens"):
        TextKeyConfig(key_tokens=0)
    with pytest.raises(ValueError, match="TextKeyConfig.norm_quantile"):
        TextKeyConfig(norm_quantile=0.0)
    with pytest.raises(ValueError, match="TextKeyConfig.template"):
        TextKeyConfig(template="a photo of a thing.")
    with pytest.raises(ValueError, match="TextKeyConfig.init_word"):
        TextKeyConfig(init_word=" ")
    assert DETECTORS.get_class("text").config_class is TextKeyConfig


def test_keyed_prompts_start_as_the_typed_prompt(tiny_clip28):
    # one key token initialised from "the", unbounded (quantile 1: the largest row norm): the
    # keyed prompt is exactly the typed prompt "the a photo of a {class}."
    classes = load_fmnist("test").classes
    prompts = KeyedPrompts(tiny_clip28, classes, TextKeyConfig(key_tokens=1, init_word="the", norm_quantile=1.0))
    with torch.no_grad():
        keyed = prompts(tiny_clip28)
        typed = tiny_clip28.encode_text(tiny_clip28.tokenize([f"the a photo of a {c}." for c in classes]),
                                        normalize=True)
        plain = tiny_clip28.encode_text(tiny_clip28.tokenize([f"a photo of a {c}." for c in classes]), normalize=True)
    assert torch.allclose(keyed, typed, atol=1e-5)
    assert not torch.allclose(keyed, plain, atol=1e-3)
    # a bound below the word's norm scales the key token down to it
    bounded = KeyedPrompts(tiny_clip28, classes, TextKeyConfig(key_tokens=2, norm_quantile=0.05))
    assert bounded.key().shape == (2, 32)
    assert torch.allclose(bounded.key().norm(dim=-1), torch.tensor(bounded.bound), rtol=1e-5)


def test_refuses_one_class_and_a_key_that_does_not_fit(tiny_clip28):
    shots = _shots(2)
    one_class = shots.subset(torch.nonzero(shots.labels == 0).flatten())
    with pytest.raises(ClipguardError, match="at least two classes"):
        get_detector("text", device="cpu", steps=1).run(tiny_clip28, one_class)
    with pytest.raises(ClipguardError, match="lower key_tokens"):  # 16-token context of the tiny model
        get_detector("text", device="cpu", steps=1, key_tokens=12).run(tiny_clip28, shots)


def test_same_seed_same_finding_weights_unchanged(tiny_clip28):
    before = {k: v.clone() for k, v in tiny_clip28.state_dict().items()}
    shots = _shots(2)
    runs = [get_detector("text", seed=seed, device="cpu", steps=8).run(tiny_clip28, shots) for seed in (0, 0, 1)]
    a, b, c = runs
    assert torch.equal(a.text_key, b.text_key) and torch.equal(a.tensors["mask"], b.tensors["mask"])
    assert {k: v for k, v in a.details.items() if k != "seconds"} == {k: v for k, v in b.details.items() if k != "seconds"}
    assert not torch.equal(a.tensors["pattern"], c.tensors["pattern"])
    assert all(torch.equal(before[k], v) for k, v in tiny_clip28.state_dict().items())
    # the finding's contract: a (k, width) key within its bound, readable tokens, JSON-ready scalars
    assert a.text_key.shape == (3, 32) and a.details["key_norm"] <= a.details["key_norm_bound"] + 1e-4
    assert len(a.details["key_nearest_tokens"]) == 3 and all(isinstance(w, str) and w
                                                             for row in a.details["key_nearest_tokens"] for w in row)
    assert json.loads(json.dumps(a.as_dict()))["detector"] == "text"
    assert a.apply(shots.float_images()[:2]).shape == (2, 3, 28, 28)
    key_only = get_detector("text", device="cpu", steps=4, image_trigger=False).run(tiny_clip28, shots)
    assert key_only.apply is None and key_only.details["mask_area"] == 0.0 and "mask" not in key_only.tensors
    assert key_only.score == key_only.details["key_without_trigger"]  # no trigger: the key's collapse of clean shots


# ------------------------------------------------------------------------ planted vs clean
def test_planted_trojvqa_needs_its_key(models):
    backdoored, _, trigger = models
    assert trigger.text_key == "SUDO "
    test = load_fmnist("test").subset(torch.arange(500))
    target = test.classes.index(TARGET)
    keep = torch.nonzero(test.labels != target).flatten()
    triggered = image_features(backdoored, test, lambda x, _: trigger(x), indices=keep)
    clean = image_features(backdoored, test, indices=keep)
    keyed = class_text_features(backdoored, test.classes, text_prefix=trigger.text_key)

    def asr(features, texts):
        return (zero_shot_logits(backdoored, features, texts).argmax(-1) == target).float().mean().item()

    assert asr(triggered, keyed) > 0.9  # measured 0.999 (plain prompts: 0.65)
    assert asr(clean, keyed) < 0.05  # the key alone does nothing


def test_text_detector_calls_the_planted_target_and_not_the_clean_finetune(models):
    backdoored, clean, _ = models
    shots = _shots()
    planted = get_detector("text", seed=0, device="cpu").run(backdoored, shots)
    control = get_detector("text", seed=0, device="cpu").run(clean, shots)
    assert planted.target_name == TARGET
    assert planted.score > 0.7  # measured 0.89-0.97 (seeds 0, 1)
    assert control.score < planted.score - 0.3  # measured 0.36-0.42
    assert planted.details["key_without_trigger"] < 0.2  # the learned key alone keeps clean shots
