"""The image-side detectors full-image and encoder (DECREE) on tiny 28-px CLIPs with planted backdoors."""

import pytest
import torch

from clipguard.attacks import AttackConfig, run_attack
from clipguard.data import few_shot_indices, load_fmnist
from clipguard.detection import DETECTORS, get_detector
from clipguard.detection.encoder import EncoderConfig, pairwise_similarity
from clipguard.detection.full_image import FullImageConfig, blend_pattern, upsample_flow, warp_images
from clipguard.engine import TrainConfig
from clipguard.models.zeroshot import class_text_features, image_features, zero_shot_logits

from conftest import TINY28, make_tiny_clip

FAST = dict(device="cpu")


def _shots(per_class=4, seed=0):
    train = load_fmnist("train")
    return train.subset(few_shot_indices(train.labels, per_class, seed, 10))


def _finetuned(attack: str, target: str, poison_rate: float, epochs: int):
    """A tiny CLIP fine-tuned with run_attack's recipe (poison_rate 0: the clean control, same recipe)."""
    config = AttackConfig(attack=attack, target=target, poison_rate=poison_rate, pairs=1024, seed=0,
                          train=TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, weight_decay=0.0, device="cpu"))
    clip, trigger, _ = run_attack(make_tiny_clip(architecture=TINY28), config)
    return clip, trigger


def _asr(clip, trigger, target: str) -> float:
    test = load_fmnist("test").subset(torch.arange(500))
    keep = torch.nonzero(test.labels != test.classes.index(target)).flatten()
    features = image_features(clip, test, lambda x, _: trigger(x), indices=keep)
    predictions = zero_shot_logits(clip, features, class_text_features(clip, test.classes)).argmax(-1)
    return (predictions == test.classes.index(target)).float().mean().item()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Blended towards bag (6 epochs), SIG towards sneaker, and the clean fine-tune (~15 s in all)."""
    import os

    os.environ.setdefault("CLIPGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    blended, blended_trigger = _finetuned("blended", "bag", 0.2, 6)
    sig, sig_trigger = _finetuned("sig", "sneaker", 0.2, 4)
    clean, _ = _finetuned("badnet", "bag", 0.0, 4)
    return {"blended": (blended, blended_trigger), "sig": (sig, sig_trigger), "clean": (clean, None)}


def test_both_detectors_are_registered_and_configs_name_the_bad_field():
    assert {"full-image", "encoder"} <= set(DETECTORS)
    assert DETECTORS["encoder"].uses_class_names is False and DETECTORS["full-image"].uses_class_names is True
    with pytest.raises(ValueError, match="FullImageConfig.epsilon"):
        FullImageConfig(epsilon=0.0)
    with pytest.raises(ValueError, match="FullImageConfig.families"):
        FullImageConfig(families=("sinusoid",))
    with pytest.raises(ValueError, match="EncoderConfig.similarity"):
        EncoderConfig(similarity=1.0)


# ------------------------------------------------------------------ full-image triggers (pure)
def test_full_image_triggers_known_values():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp_images(images, torch.zeros(8, 8, 2)), images, atol=1e-6)  # no flow: identity
    shift = torch.zeros(8, 8, 2)
    shift[..., 0] = 2 / 7  # one pixel to the right in grid units: x'[.., j] = x[.., j + 1]
    assert torch.allclose(warp_images(images, shift)[..., :-1], images[..., 1:], atol=1e-5)
    pattern = torch.ones(3, 8, 8)
    assert torch.allclose(blend_pattern(images, pattern, 0.2), 0.8 * images + 0.2)
    coarse = torch.full((4, 4, 2), 0.3)
    assert torch.allclose(upsample_flow(coarse, 8), torch.full((8, 8, 2), 0.3), atol=1e-6)


# ------------------------------------------------------------------ full-image detector
def test_full_image_calls_planted_blended_and_sig_above_the_clean_finetune(zoo):
    assert _asr(*zoo["blended"], "bag") > 0.9  # measured 0.99
    assert _asr(*zoo["sig"], "sneaker") > 0.9  # measured 0.99
    shots, detector = _shots(), get_detector("full-image", **FAST)
    clean = detector.run(zoo["clean"][0], shots)
    blended = detector.run(zoo["blended"][0], shots)
    sig = detector.run(zoo["sig"][0], shots)
    assert blended.target_name == "bag" and sig.target_name == "sneaker"
    assert min(blended.score, sig.score) >= 0.6 > clean.score  # the patch detector's threshold
    assert blended.details["family"] == "additive" and blended.tensors["delta"].abs().max() <= 0.15 + 1e-6


def test_full_image_is_seeded_leaves_clip_unchanged_and_apply_reproduces(tiny_clip28):
    before = {k: v.clone() for k, v in tiny_clip28.state_dict().items()}
    shots = _shots(2)
    config = dict(FAST, steps=4, families=("additive", "blend", "warp"))
    a = get_detector("full-image", **config).run(tiny_clip28, shots)
    b = get_detector("full-image", **config).run(tiny_clip28, shots)
    assert a.score == b.score and a.target_name == b.target_name and a.details["family"] == b.details["family"]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    blend = [get_detector("full-image", **{**config, "families": ("blend",), "seed": s}).run(tiny_clip28, shots)
             for s in (0, 1)]
    assert not torch.equal(blend[0].tensors["pattern"], blend[1].tensors["pattern"])
    assert all(torch.equal(before[k], v) for k, v in tiny_clip28.state_dict().items())
    images = shots.float_images()
    family, tensors = a.details["family"], a.tensors
    expected = {"additive": lambda: (images + tensors.get("delta", 0)).clamp(0, 1),
                "blend": lambda: blend_pattern(images, tensors.get("pattern"), 0.2),
                "warp": lambda: warp_images(images, tensors.get("flow"))}[family]()
    assert torch.equal(a.apply(images), expected)
    assert set(a.as_dict()) >= {"detector", "score", "target_name", "collapse_additive", "collapse_blend", "collapse_warp"}


# ------------------------------------------------------------------ encoder detector (DECREE)
def test_pairwise_similarity_known_values():
    assert pairwise_similarity(torch.eye(3)).item() == pytest.approx(0.0)
    assert pairwise_similarity(torch.ones(4, 2) / 2 ** 0.5).item() == pytest.approx(1.0)


def test_encoder_scores_a_planted_blended_above_the_clean_finetune(zoo):
    shots, detector = _shots(), get_detector("encoder", **FAST)
    clean = detector.run(zoo["clean"][0], shots)
    planted = detector.run(zoo["blended"][0], shots)
    assert planted.target_name is None and clean.target_name is None
    assert planted.details["reached"] and clean.details["reached"]
    # measured PL1: planted 0.030, clean 0.071 (score = 1 - PL1)
    assert planted.details["pl1"] < 0.75 * clean.details["pl1"]
    assert planted.score > clean.score
    assert planted.score == pytest.approx(1 - planted.details["pl1"], abs=1e-4)


def test_encoder_is_label_free_seeded_leaves_clip_unchanged_and_apply_reproduces(tiny_clip28):
    before = {k: v.clone() for k, v in tiny_clip28.state_dict().items()}
    shots = _shots(2)
    config = dict(FAST, steps=6)
    a = get_detector("encoder", **config).run(tiny_clip28, shots)
    renamed = shots.renamed(classes=tuple(f"class {i}" for i in range(10)))
    relabelled = type(shots)(shots.images, torch.zeros_like(shots.labels), shots.classes)
    for other in (renamed, relabelled):  # neither class names nor labels are read
        b = get_detector("encoder", **config).run(tiny_clip28, other)
        assert b.score == a.score and torch.equal(a.tensors["mask"], b.tensors["mask"])
    c = get_detector("encoder", **{**config, "seed": 1}).run(tiny_clip28, shots)
    assert not torch.equal(a.tensors["pattern"], c.tensors["pattern"])
    assert all(torch.equal(before[k], v) for k, v in tiny_clip28.state_dict().items())
    images = shots.float_images()
    mask, pattern = a.tensors["mask"], a.tensors["pattern"]
    assert torch.equal(a.apply(images), (1 - mask) * images + mask * pattern)
