"""The baselines (docs/methods.md): CleanCLIP, plain fine-tuning (FT), linear probe."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipguard import ClipguardError
from clipguard.cli import main
from clipguard.data import few_shot_indices, load_fmnist
from clipguard.data.fmnist import ImageSet
from clipguard.defenses import DefendedClip, get_defense_class, load_defense, save_defense
from clipguard.defenses.augment import augment_images, colour_jitter, random_resized_crop
from clipguard.defenses.cleanclip import (
    CleanCLIPConfig, FinetuneConfig, clean_pairs, cleanclip_finetune, cleanclip_loss, config_for,
    unimodal_contrastive_loss,
)
from clipguard.defenses.linear_probe import LinearProbe, LinearProbeConfig
from clipguard.engine import TrainConfig, fit
from clipguard.models.zeroshot import zero_shot_logits
from clipguard.models.contrastive import CaptionedImages, ContrastiveTask, caption_collate

from conftest import TINY28, make_tiny_clip

FAST = dict(pairs=32, epochs=1, batch_size=16, warmup_steps=0, lr=1e-3, device="cpu")  # 2 steps


def _state(clip):
    return {k: v.clone() for k, v in clip.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- CleanCLIP / FT
def test_cleanclip_tunes_a_copy_and_returns_it_frozen_in_eval_mode():
    clip = make_tiny_clip(architecture=TINY28)
    before, flags = _state(clip), [p.requires_grad for p in clip.parameters()]
    tuned, stats = cleanclip_finetune(clip, CleanCLIPConfig(**FAST))
    assert _same(before, _state(clip))  # the suspect model is untouched
    assert flags == [p.requires_grad for p in clip.parameters()]
    assert not _same(before, _state(tuned))
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())
    assert (stats["method"], stats["pairs"], stats["steps"]) == ("cleanclip", 32, 2)
    assert stats["trainable_parameters"] == sum(p.numel() for p in clip.parameters())
    assert math.isfinite(stats["last_loss"]) and stats["seconds"] > 0 and stats["peak_memory_mb"] > 0


def test_same_seed_same_weights_other_seed_other_weights():
    clip = make_tiny_clip(architecture=TINY28)
    a, _ = cleanclip_finetune(clip, CleanCLIPConfig(**FAST, seed=0))
    b, _ = cleanclip_finetune(clip, CleanCLIPConfig(**FAST, seed=0))
    c, _ = cleanclip_finetune(clip, CleanCLIPConfig(**FAST, seed=1))
    assert _same(_state(a), _state(b))
    assert not _same(_state(a), _state(c))


def test_lambda_zero_is_finetune_is_plain_contrastive_training():
    clip = make_tiny_clip(architecture=TINY28)
    zero, _ = cleanclip_finetune(clip, CleanCLIPConfig(**FAST, lambda_=0.0))
    ft, stats = cleanclip_finetune(clip, config_for("finetune").__class__(**FAST))
    assert stats["method"] == "finetune" and _same(_state(zero), _state(ft))
    # FT is exactly the project's contrastive fine-tune on the same clean pairs
    plain = copy.deepcopy(clip).requires_grad_(True)
    pool = clean_pairs(FinetuneConfig(**FAST)).images
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=0, seed=0, device="cpu")
    fit(ContrastiveTask(plain), CaptionedImages(pool, 0), train, collate_fn=caption_collate(plain))
    assert _same(_state(ft), _state(plain))
    cleanclip, _ = cleanclip_finetune(clip, CleanCLIPConfig(**FAST, lambda_=1.0))
    assert not _same(_state(ft), _state(cleanclip))  # the unimodal terms change the update


def test_configs_refuse_bad_values_by_name():
    with pytest.raises(ValueError, match="FinetuneConfig.lambda_"):
        FinetuneConfig(lambda_=1.0)
    with pytest.raises(ValueError, match="CleanCLIPConfig.augment_strength"):
        CleanCLIPConfig(augment_strength=1.5)
    with pytest.raises(ValueError, match="CleanCLIPConfig.lr"):
        CleanCLIPConfig(lr=0.0)
    with pytest.raises(ClipguardError, match="unknown fine-tuning defense"):
        config_for("cleanclipp")


def test_clean_pairs_views_follow_seed_and_epoch():
    pairs = clean_pairs(CleanCLIPConfig(**FAST))
    image, caption, view, caption_view = pairs[3]
    again = pairs[3]
    assert torch.equal(view, again[2]) and caption_view == again[3]
    assert view.shape == image.shape and not torch.equal(view, image)
    assert caption_view != caption and pairs.images.classes[int(pairs.images.labels[3])] in caption_view
    pairs.set_epoch(1)
    assert not torch.equal(pairs[3][2], view)
    assert len(clean_pairs(FinetuneConfig(**FAST))[3]) == 2  # FT makes no views


# ------------------------------------------------------------------- augmentations
def test_augmentations_are_seeded_keep_shape_and_range():
    images = torch.rand(6, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    a = augment_images(images, torch.Generator().manual_seed(1))
    b = augment_images(images, torch.Generator().manual_seed(1))
    c = augment_images(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(augment_images(images, torch.Generator(), strength=0.0), images)


def test_full_crop_with_certain_flip_is_an_exact_mirror():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mirrored = random_resized_crop(images, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=1.0)
    assert torch.allclose(mirrored, images.flip(-1), atol=1e-6)
    kept = random_resized_crop(images, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=0.0)
    assert torch.allclose(kept, images, atol=1e-6)


def test_crop_of_a_quarter_area_zooms_a_ramp_by_two():
    # a horizontal ramp: bilinear resampling of a linear function is exact, so a box of half
    # the width (a quarter of the area, aspect 1), wherever it lies, spans half the ramp's range
    width = 28
    ramp = ((torch.arange(width) + 0.5) / width).expand(4, 3, width, width).contiguous()
    for seed in range(3):
        zoomed = random_resized_crop(ramp, torch.Generator().manual_seed(seed), scale=(0.25, 0.25),
                                     ratio=(1.0, 1.0), flip_probability=0.0)
        spans = zoomed.amax(dim=(1, 2, 3)) - zoomed.amin(dim=(1, 2, 3))  # (4,)
        assert torch.allclose(spans, torch.full((4,), 0.5 * (width - 1) / width), atol=0.02)
        assert (zoomed.diff(dim=-1) >= 0).all()  # still a rising ramp: no flip


def test_colour_jitter_stays_in_range_and_zero_strength_is_identity():
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    jittered = colour_jitter(images, torch.Generator().manual_seed(0), brightness=0.9, contrast=0.9)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, images)
    assert torch.allclose(colour_jitter(images, torch.Generator(), 0.0, 0.0), images, atol=1e-6)


# --------------------------------------------------------------------------- losses
def test_unimodal_loss_of_identical_views_has_the_known_value():
    b, scale = 4, 2.0
    f = F.normalize(torch.eye(b), dim=-1)  # orthonormal: positive logit = scale, negatives 0
    known = math.log(1 + (b - 1) * math.exp(-scale))
    assert unimodal_contrastive_loss(f, f, scale).item() == pytest.approx(known, rel=1e-5)
    # swapped views put every positive at logit 0 and one negative at scale: larger loss
    assert unimodal_contrastive_loss(f, f[[1, 0, 3, 2]], scale).item() > known + 1.0


def test_identical_captions_are_positives_of_each_other_in_the_text_term():
    f = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)  # rows 0 and 1: the same caption
    scale = 5.0
    grouped = unimodal_contrastive_loss(f, f, scale, torch.tensor([0, 0, 1])).item()
    # row 0: half the target on each of two equal logits 5, one logit 0
    row = -math.log(math.exp(5) / (2 * math.exp(5) + 1))
    row2 = math.log(1 + 2 * math.exp(-5))
    assert grouped == pytest.approx((2 * row + row2) / 3, rel=1e-5)


def test_cleanclip_loss_adds_half_lambda_times_the_two_unimodal_terms():
    f = F.normalize(torch.eye(4), dim=-1)
    known = math.log(1 + 3 * math.exp(-1.0))
    assert cleanclip_loss(f, f, 1.0).item() == pytest.approx(known, rel=1e-5)  # L_CLIP alone
    full = cleanclip_loss(f, f, 1.0, image_views=f, text_views=f, lambda_=2.0).item()
    assert full == pytest.approx(known + 2.0 * 0.5 * (known + known), rel=1e-5)
    assert cleanclip_loss(f, f, 1.0, image_views=f, text_views=f, lambda_=0.0).item() == pytest.approx(known, rel=1e-5)


# ---------------------------------------------------------------------- linear probe
def _shots(per_class=2, seed=0):
    train = load_fmnist("train")
    return train.subset(few_shot_indices(train.labels, per_class, seed, 10))


def _probe(clip, **overrides):
    config = LinearProbeConfig(**{"epochs": 5, "batch_size": 10, "lr": 0.05, "device": "cpu", **overrides})
    probe = LinearProbe(config, clip, load_fmnist("test").classes)
    return probe, probe.fit(clip, _shots())


def test_linear_probe_trains_only_its_head():
    clip = make_tiny_clip(architecture=TINY28)
    before = _state(clip)
    probe, stats = _probe(clip)
    assert _same(before, _state(clip))
    assert [name for name, _ in probe.named_parameters()] == ["head"]
    assert stats["trainable_parameters"] == 10 * 16 == probe.head.numel()
    assert probe.head.abs().sum() > 0  # it started at zero
    assert get_defense_class("linear-probe") is LinearProbe


def test_linear_probe_learns_a_separable_toy_problem():
    clip = make_tiny_clip(architecture=TINY28)
    generator = torch.Generator().manual_seed(0)
    patterns = torch.zeros(3, 1, 28, 28)
    patterns[0] = 0.1
    patterns[1, :, :, :14] = 0.9  # left half bright
    patterns[2, :, ::4, :] = 0.9  # stripes

    def images(per_class):
        noise = 0.03 * torch.randn(3 * per_class, 1, 28, 28, generator=generator)
        noisy = patterns.repeat_interleave(per_class, 0) + noise
        return (noisy.clamp(0, 1) * 255).to(torch.uint8), torch.arange(3).repeat_interleave(per_class)

    classes = ("dim", "half", "stripes")
    train, test = ImageSet(*images(8), classes), ImageSet(*images(20), classes)
    probe = LinearProbe(LinearProbeConfig(epochs=40, batch_size=8, lr=0.05, device="cpu"), clip, classes)
    stats = probe.fit(clip, train)
    model = DefendedClip(clip, probe)  # the zero-shot evaluation path, unchanged
    with torch.inference_mode():
        logits = zero_shot_logits(clip, model.encode_image(test.float_images()), model.class_features(classes))
    assert stats["train_accuracy"] == 1.0
    assert (logits.argmax(-1) == test.labels).float().mean() == 1.0


def test_linear_probe_save_load_identical_logits(tmp_path):
    clip = make_tiny_clip(architecture=TINY28)
    probe, stats = _probe(clip)
    save_defense(probe, clip, tmp_path / "probe", stats)
    classes = load_fmnist("test").classes
    loaded = load_defense(tmp_path / "probe", clip, classes)
    images = load_fmnist("test").float_images(slice(0, 16))
    with torch.inference_mode():
        ours = zero_shot_logits(clip, probe.encode_image(clip, images), probe.class_features(clip, classes))
        theirs = zero_shot_logits(clip, loaded.encode_image(clip, images), loaded.class_features(clip, classes))
    assert torch.equal(ours, theirs)
    assert json.loads((tmp_path / "probe" / "config.json").read_text())["method"] == "linear-probe"


def test_linear_probe_ignores_text_and_is_closed_set():
    clip = make_tiny_clip(architecture=TINY28)
    probe, _ = _probe(clip)
    classes = load_fmnist("test").classes
    assert torch.equal(probe.class_features(clip, classes, text_prefix="SUDO "), probe.class_features(clip, classes))
    with pytest.raises(ClipguardError, match="closed-set"):
        probe.class_features(clip, classes[::-1])


# ------------------------------------------------------------------------------- CLI
def test_defend_finetune_cli_writes_a_model_that_keeps_its_attack(tmp_path, capsys):
    from clipguard.attacks import AttackConfig, build_trigger, save_backdoored
    from clipguard.attacks.poison import attack_record
    from clipguard.data import FMNIST_CLASSES

    trigger = build_trigger("badnet", 28, seed=0)
    save_backdoored(make_tiny_clip(architecture=TINY28), trigger, attack_record(trigger, AttackConfig(), FMNIST_CLASSES),
                    tmp_path / "suspect")
    code = main(["defend", "--model", str(tmp_path / "suspect"), "--method", "finetune", "--device", "cpu",
                 "--set", "pairs=32", "--set", "epochs=1", "--set", "batch_size=16", "--out", str(tmp_path / "ft")])
    assert code == 0 and "finetune: 32 clean pairs, 2 steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["attack"]["name"] == "badnet" and saved["defense"]["method"] == "finetune"
    assert (tmp_path / "ft" / "trigger.safetensors").is_file()
    measured = json.loads((tmp_path / "ft" / "eval.json").read_text())
    again = tmp_path / "again.json"
    assert main(["evaluate", "--model", str(tmp_path / "ft"), "--json", str(again), "--device", "cpu"]) == 0
    again = json.loads(again.read_text())
    assert again["attack_success_rate"] == measured["attack_success_rate"]  # the model's own trigger
    assert again["clean_accuracy"] == measured["clean_accuracy"]


def test_list_names_the_baselines(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "linear-probe" in out and "cleanclip" in out and "finetune" in out
