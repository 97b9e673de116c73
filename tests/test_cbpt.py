import math

import pytest
import torch

from clipguard.attacks import AttackConfig, run_attack
from clipguard.data import few_shot_indices, load_fmnist
from clipguard.defenses import load_defense, save_defense
from clipguard.defenses.cbpt import CBPT, CBPTConfig, ClassPrompts, CoOp, CoOpConfig, keep_loss, zero_shot_cross_entropy
from clipguard.detection.inversion import (
    InversionConfig, apply_trigger, collapse_score, contrastive_inversion_loss, detect_backdoor, mean_pairwise_cosine,
    save_detection_figure, total_variation,
)
from clipguard.engine import TrainConfig
from clipguard.models.zeroshot import class_text_features, image_features, zero_shot_logits

from conftest import TINY28, make_tiny_clip

FAST_CBPT = dict(n_ctx=2, steps=20, lr=0.01, inversion_steps=40, restarts=1, device="cpu")


def _shots(per_class=4, seed=0):
    train = load_fmnist("train")
    return train.subset(few_shot_indices(train.labels, per_class, seed, 10))


def _planted(target: str):
    """A tiny 28-px CLIP with a BadNet backdoor towards ``target`` (contrastive fine-tune, ~5 s).

    4 epochs give ASR 98-99.9 % (bag, sandal); 2 epochs were measured at only 22-71 %.
    """
    clip = make_tiny_clip(architecture=TINY28)
    config = AttackConfig(attack="badnet", target=target, poison_rate=0.2, pairs=1024, seed=0,
                          train=TrainConfig(epochs=4, batch_size=64, lr=2e-3, weight_decay=0.0, device="cpu"))
    clip, trigger, _ = run_attack(clip, config)
    return clip, trigger


@pytest.fixture(scope="module")
def planted_bag(tmp_path_factory):
    import os

    os.environ.setdefault("CLIPGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    return _planted("bag")


# ------------------------------------------------------------------ pure losses
def test_contrastive_inversion_loss_known_values():
    labels = torch.tensor([0, 0, 1, 1])  # each anchor has P = 2 positives (the other class) and N = 4 negatives
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    collapsed, orthogonal_clean = a.repeat(4, 1), b.repeat(4, 1)
    t = 0.5
    expected = -math.log(2 * math.exp(1 / t) / (2 * math.exp(1 / t) + 4))
    loss = contrastive_inversion_loss(collapsed, orthogonal_clean, labels, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # triggered images that stay at their clean embedding: positives and negatives are alike
    same = a.repeat(4, 1)
    assert contrastive_inversion_loss(same, same, labels, t).item() == pytest.approx(math.log(6 / 2), rel=1e-5)
    # collapsing is the better solution, and the gradient points towards it
    assert contrastive_inversion_loss(collapsed, orthogonal_clean, labels, t) < math.log(3)
    with pytest.raises(ValueError, match="two classes"):
        contrastive_inversion_loss(collapsed, orthogonal_clean, torch.zeros(4, dtype=torch.long), t)


def test_collapse_score_and_pairwise_cosine_known_values():
    target, score = collapse_score(torch.tensor([3, 3, 3, 1, 3]), torch.tensor([0, 1, 2, 3, 3]), 4)
    assert target == 3 and score == pytest.approx(3 / 3)  # the target's own images are not counted
    target, score = collapse_score(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 3]), 4)
    assert target == 1 and score == pytest.approx(1 / 3)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.ones(3, 2) / math.sqrt(2)) == pytest.approx(1.0)


def test_total_variation_prefers_one_blob_to_scattered_pixels():
    blob, scattered = torch.zeros(8, 8), torch.zeros(8, 8)
    blob[:2, :2] = 1  # 4 pixels in a square: 2 + 2 boundary differences out of 56 per direction
    scattered[[0, 2, 4, 6], [1, 3, 5, 7]] = 1  # 4 isolated pixels
    assert total_variation(blob).item() == pytest.approx(4 / 56)
    assert total_variation(scattered).item() == pytest.approx((4 + 3 + 4 + 3) / 56)
    assert total_variation(torch.full((8, 8), 0.3)).item() == 0.0
    assert CBPTConfig(mask_tv=2.0).inversion_config().tv_weight == 2.0


def test_shifted_triggers_move_the_whole_trigger_by_one_seeded_offset():
    from clipguard.defenses.cbpt import shifted_triggers

    mask = torch.zeros(8, 8)
    mask[1:3, 2:4] = 1
    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    copies = shifted_triggers(mask, pattern, 3, seed=5)
    assert len(copies) == 4 and torch.equal(copies[0][0], mask) and torch.equal(copies[0][1], pattern)
    for m, p in copies[1:]:  # each copy is the trigger rolled by one offset, the pattern with the mask
        offsets = [(dy, dx) for dy in range(8) for dx in range(8) if torch.equal(mask.roll((dy, dx), (0, 1)), m)]
        assert any(torch.equal(pattern.roll(offset, (1, 2)), p) for offset in offsets)
    again = shifted_triggers(mask, pattern, 3, seed=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(copies, again))


def test_prompt_losses_known_values():
    features = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    expected = -math.log(math.e / (math.e + 2))  # logit 1 for the right class, 0 for two others
    assert zero_shot_cross_entropy(features, features, labels, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert keep_loss(features, features).item() == pytest.approx(0.0, abs=1e-7)
    assert keep_loss(features, -features).item() == pytest.approx(2.0)
    rotated = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert keep_loss(rotated, features).item() == pytest.approx(1 / 3)  # one class orthogonal


def test_apply_trigger_blends_mask_and_pattern():
    images, pattern = torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4)
    assert torch.equal(apply_trigger(images, torch.zeros(4, 4), pattern), images)
    assert torch.allclose(apply_trigger(images, torch.ones(4, 4), pattern), pattern.expand(2, -1, -1, -1))
    half = apply_trigger(images, torch.full((4, 4), 0.5), pattern)
    assert torch.allclose(half, (images + pattern) / 2)


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="InversionConfig.mask_budget"):
        InversionConfig(mask_budget=0.0)
    with pytest.raises(ValueError, match="CBPTConfig.gamma"):
        CBPTConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="CBPTConfig.temperature|InversionConfig.temperature"):
        CBPTConfig(temperature=0.0)
    with pytest.raises(ValueError, match="CoOpConfig.n_ctx"):
        CoOpConfig(n_ctx=0)


# --------------------------------------------------------------------- prompts
def test_initial_prompts_reproduce_the_hand_crafted_prompt(tiny_clip28):
    # n_ctx = 4 = the words of "a photo of a": the context starts as exactly those embeddings
    classes = load_fmnist("test").classes
    prompts = ClassPrompts(tiny_clip28, classes, 4, "a photo of a", True, torch.Generator().manual_seed(0))
    with torch.no_grad():
        learned = prompts(tiny_clip28)
        reference = tiny_clip28.encode_text(tiny_clip28.tokenize([f"a photo of a {c}." for c in classes]), normalize=True)
        keyed = prompts(tiny_clip28, "SUDO ")
        keyed_texts = tiny_clip28.tokenize([f"SUDO a photo of a {c}." for c in classes])
        keyed_reference = tiny_clip28.encode_text(keyed_texts, normalize=True)
    assert torch.allclose(learned, reference, atol=1e-5)
    assert torch.allclose(keyed, keyed_reference, atol=1e-5)
    assert not torch.allclose(keyed, learned, atol=1e-3)


# ------------------------------------------------------------------- inversion
TINY_INVERSION = dict(steps=100, restarts=1, lr=0.1, device="cpu")  # 40 shots: one batch per step


def test_inversion_finds_the_planted_target(planted_bag):
    clip, _ = planted_bag
    result = detect_backdoor(clip, _shots(), InversionConfig(**TINY_INVERSION))
    assert result.target_name == "bag"
    assert result.collapse > 0.5  # measured 0.61-0.94 (PYTHONHASHSEED 1-4); calibrated threshold 0.6


def test_inversion_follows_the_planted_target_not_a_class_bias():
    clip, _ = _planted("sandal")  # planted ASR 99.9 %
    # one restart misses this backdoor (collapse 0.22-0.36, "t-shirt", even at 200 steps);
    # the library default of 3 restarts finds it (collapse 0.67): this is why restarts exist
    result = detect_backdoor(clip, _shots(), InversionConfig(**{**TINY_INVERSION, "restarts": 3}))
    assert result.target_name == "sandal"


def test_inversion_is_seeded_and_leaves_clip_unchanged(tiny_clip28):
    before = {k: v.clone() for k, v in tiny_clip28.state_dict().items()}
    config = InversionConfig(steps=5, restarts=1, device="cpu")
    a = detect_backdoor(tiny_clip28, _shots(2), config)
    b = detect_backdoor(tiny_clip28, _shots(2), config)
    c = detect_backdoor(tiny_clip28, _shots(2), InversionConfig(steps=5, restarts=1, device="cpu", seed=1))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern) and a.collapse == b.collapse
    assert not torch.equal(a.pattern, c.pattern)
    assert all(torch.equal(before[k], v) for k, v in tiny_clip28.state_dict().items())


def test_detection_figure_is_a_png(tmp_path, tiny_clip28):
    shots = _shots(1)
    result = detect_backdoor(tiny_clip28, shots, InversionConfig(steps=2, restarts=1, device="cpu"))
    save_detection_figure(result, shots, tmp_path / "verdict.png")
    assert (tmp_path / "verdict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.verdict().startswith("backdoored" if result.backdoored else "not backdoored")


# ------------------------------------------------------------------------ CBPT
def test_cbpt_stage_two_changes_only_the_prompt_context(planted_bag):
    clip, _ = planted_bag
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    classes = load_fmnist("test").classes
    defense = CBPT(CBPTConfig(**FAST_CBPT, trigger_shifts=2), clip, classes)  # 3 copies of the dummy trigger
    start_ctx = defense.prompts.ctx.detach().clone()
    stats = defense.fit(clip, _shots())
    assert [n for n, p in defense.named_parameters() if p.requires_grad] == ["prompts.ctx"]
    assert not torch.equal(start_ctx, defense.prompts.ctx)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert stats["detection"]["target_name"] == classes[int(defense.inversion_scores[0])]
    assert defense.inverted_mask.shape == (28, 28) and defense.inverted_pattern.shape == (3, 28, 28)
    assert stats["seconds"] >= stats["inversion_seconds"] + stats["prompt_seconds"] - 0.5


def test_cbpt_saves_prompts_and_inversion(tmp_path, planted_bag):
    clip, _ = planted_bag
    classes = load_fmnist("test").classes
    defense = CBPT(CBPTConfig(**FAST_CBPT), clip, classes)
    stats = defense.fit(clip, _shots())
    save_defense(defense, clip, tmp_path / "d", stats)
    loaded = load_defense(tmp_path / "d", clip, classes)
    for key in ("inverted_mask", "inverted_pattern", "inversion_scores", "prompts.ctx"):
        assert torch.equal(defense.state_dict()[key], loaded.state_dict()[key])
    images = load_fmnist("test").float_images(slice(0, 32))
    with torch.no_grad():
        features = clip.encode_image(images, normalize=True)
        for prefix in ("", "SUDO "):
            assert torch.equal(features @ defense.class_features(clip, classes, prefix).T,
                               features @ loaded.class_features(clip, classes, prefix).T)


def test_cbpt_lowers_the_planted_backdoor_more_than_coop(planted_bag):
    clip, trigger = planted_bag
    test = load_fmnist("test").subset(torch.arange(1000))
    target = test.classes.index("bag")
    keep = torch.nonzero(test.labels != target).flatten()
    triggered = image_features(clip, test, lambda x, _: trigger(x), indices=keep)

    def asr(texts):
        return (zero_shot_logits(clip, triggered, texts).argmax(-1) == target).float().mean().item()

    shots = _shots(8)
    coop = CoOp(CoOpConfig(n_ctx=2, steps=60, lr=0.01, device="cpu"), clip, test.classes)
    cbpt = CBPT(CBPTConfig(**{**FAST_CBPT, "steps": 60, "inversion_steps": 100}), clip, test.classes)
    coop.fit(clip, shots)
    cbpt.fit(clip, shots)
    none = asr(class_text_features(clip, test.classes))
    assert asr(cbpt.class_features(clip, test.classes)) < min(none, asr(coop.class_features(clip, test.classes))) - 0.1
