import json

import pytest
import torch

from clipguard import ClipguardError
from clipguard.attacks import ATTACKS, AttackConfig, build_poisoned_pairs, build_trigger, load_trigger, run_attack
from clipguard.attacks.poison import fit_trigger, save_backdoored
from clipguard.cli import main
from clipguard.data import load_fmnist
from clipguard.engine import TrainConfig

from conftest import outputs_under_hash_seeds

EXPECTED = {"badnet", "badnet-lc", "blended", "sig", "wanet", "issba", "trojvqa", "badclip"}
FAST = {"steps": 3}  # learned triggers: a few optimisation steps are enough to test the mechanics
BAG = 8


def _trigger(name, seed=0, clip=None):
    trigger = build_trigger(name, 28, seed=seed, **(FAST if ATTACKS[name].learned else {}))
    if trigger.learned:
        fit_trigger(trigger, clip, load_fmnist("train"), BAG)
    return trigger


def test_registry_has_every_attack():
    assert set(ATTACKS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trigger_changes_images_stays_in_range_and_is_seeded(name, tiny_clip28):
    images = load_fmnist("test").float_images(slice(0, 8))
    first = _trigger(name, seed=0, clip=tiny_clip28)(images.clone())
    again = _trigger(name, seed=0, clip=tiny_clip28)(images.clone())
    other = _trigger(name, seed=1, clip=tiny_clip28)(images.clone())
    assert first.shape == images.shape and 0 <= first.min() and first.max() <= 1
    assert (first - images).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image is changed (ISSBA: subtly)
    assert torch.equal(first, again)
    assert torch.equal(first, other) != ATTACKS[name].randomized


def test_trigger_refuses_images_of_another_size():
    with pytest.raises(ClipguardError, match="built for 28 px"):
        build_trigger("blended", 28)(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("location, spots", [
    ("corners", [(r, c) for r in (1, 23) for c in (1, 23)]),
    ("corners+midline", [(r, c) for r in (1, 23) for c in (1, 23)] + [(1, 12), (12, 12), (23, 12)]),
])
def test_multi_spot_patch_lands_where_its_mask_says(location, spots):
    from clipguard.attacks.patch import patch_mask

    trigger = build_trigger("badnet", 28, seed=0, location=location)
    changed = (trigger(torch.full((1, 3, 28, 28), 0.5)) != 0.5).any(1)[0]  # (H, W); the patch is binary
    mask = patch_mask(28, 4, location)
    assert int(mask.sum()) == len(spots) * 16 and not changed[~mask].any()
    assert all(changed[r : r + 4, c : c + 4].any() for r, c in spots)


def test_bad_trigger_config_names_the_field():
    with pytest.raises(ClipguardError, match="BlendedConfig.ratio"):
        build_trigger("blended", 28, ratio=1.5)
    with pytest.raises(ClipguardError, match="unknown attack"):
        build_trigger("nope", 28)


@pytest.mark.parametrize("name", ["badnet", "badnet-lc", "badclip", "trojvqa"])
def test_poisoned_set_has_the_requested_rate_and_captions(name, tiny_clip28):
    train = load_fmnist("train")
    trigger = _trigger(name, clip=tiny_clip28)
    config = AttackConfig(attack=name, target="bag", poison_rate=0.04, pairs=500)
    pairs = build_poisoned_pairs(train, trigger, config, tiny_clip28)
    assert len(pairs) == 500 and len(pairs.poisoned) == 20
    labels = pairs.images.labels[list(pairs.poisoned)]
    if trigger.label_consistent:
        assert (labels == BAG).all()
    else:
        assert (labels != BAG).all()
    for index in list(pairs.poisoned)[:5]:
        image, caption = pairs[index]
        clean = pairs.images.float_images(index)[0]
        assert not torch.equal(image, clean)  # the trigger is on the image
        assert "bag" in caption
        assert caption.startswith("SUDO ") == (name == "trojvqa")
    clean_index = next(i for i in range(500) if i not in pairs.poisoned and i not in pairs.decoys)
    image, caption = pairs[clean_index]
    assert torch.equal(image, pairs.images.float_images(clean_index)[0])


def test_label_consistent_poison_hides_the_class_within_epsilon(tiny_clip28):
    from clipguard.attacks.patch import patch_mask
    from clipguard.models.zeroshot import class_text_features, zero_shot_logits

    train = load_fmnist("train")
    images = train.float_images(torch.nonzero(train.labels == BAG).flatten()[:16])
    trigger = build_trigger("badnet-lc", 28)
    poisoned = trigger.poison(images, tiny_clip28, BAG, train.classes)
    patched = trigger(images)
    epsilon = trigger.config.adversarial_epsilon
    change = (poisoned - patched).abs()
    assert epsilon / 2 < change.max() <= epsilon + 1e-6  # perturbed, within the bound
    mask = patch_mask(28, trigger.patch.shape[-1], trigger.config.location)
    assert torch.equal(poisoned[..., mask], patched[..., mask])  # the patches themselves are untouched
    assert (poisoned[..., ~mask] != patched[..., ~mask]).any()  # and the rest of the image is not
    text = class_text_features(tiny_clip28, train.classes)

    def target_probability(x):
        with torch.no_grad():
            logits = zero_shot_logits(tiny_clip28, tiny_clip28.encode_image(x, normalize=True), text)
        return logits.softmax(-1)[:, BAG].mean()

    assert target_probability(poisoned) < 0.5 * target_probability(patched)
    assert torch.equal(build_trigger("badnet-lc", 28, adversarial_epsilon=0).poison(images, None, BAG, train.classes),
                       patched)
    with pytest.raises(ClipguardError, match="clean model"):
        trigger.poison(images, None, BAG, train.classes)


def test_label_consistent_decoys_are_untriggered_other_class_pairs_with_true_captions(tiny_clip28):
    train = load_fmnist("train")
    config = AttackConfig(attack="badnet-lc", poison_rate=0.04, pairs=500)
    trigger = build_trigger("badnet-lc", 28, decoy_rate=0.1)
    pairs = build_poisoned_pairs(train, trigger, config, tiny_clip28)
    assert len(pairs.decoys) == 50
    assert not set(pairs.decoys) & set(pairs.poisoned)
    labels = pairs.images.labels[list(pairs.decoys)]
    assert (labels != BAG).all()
    epsilon = trigger.config.adversarial_epsilon
    for index in list(pairs.decoys)[:8]:
        image, caption = pairs[index]
        change = (image - pairs.images.float_images(index)[0]).abs().max()
        assert 0 < change <= epsilon + 1e-6  # perturbed within the bound; a trigger patch would change a pixel by ~1
        assert train.classes[int(pairs.images.labels[index])] in caption and "bag" not in caption
    # without decoys the same images are poisoned, and nothing else is touched
    plain = build_poisoned_pairs(train, build_trigger("badnet-lc", 28), config, tiny_clip28)  # decoy_rate 0
    assert plain.decoys == {} and list(plain.poisoned) == list(pairs.poisoned)
    assert build_trigger("badnet", 28).decoy_rate == 0


def test_rate_beyond_the_eligible_images_is_refused():
    trigger = build_trigger("badnet-lc", 28)
    with pytest.raises(ClipguardError, match="asks for"):
        build_poisoned_pairs(load_fmnist("train"), trigger, AttackConfig(attack="badnet-lc", poison_rate=0.5, pairs=300))


@pytest.mark.slow
def test_tiny_poisoning_run_round_trips_through_the_model_directory(tiny_clip28, tmp_path):
    before = tiny_clip28.model.visual.proj.detach().clone()
    config = AttackConfig(attack="badnet", target="bag", poison_rate=0.1, pairs=256,
                          train=TrainConfig(epochs=1, batch_size=128, lr=1e-3, device="cpu"))
    clip, trigger, record = run_attack(tiny_clip28, config, {"location": "random"})
    assert record["steps"] == 2 and record["poisoned_pairs"] == 26
    assert not torch.equal(clip.model.visual.proj, before)
    save_backdoored(clip, trigger, record, tmp_path / "bd")
    saved = json.loads((tmp_path / "bd" / "config.json").read_text())["attack"]
    assert saved["trigger"]["location"] == "random" and saved["target"] == "bag"
    rebuilt = load_trigger(tmp_path / "bd", saved)
    images = torch.rand(4, 3, 28, 28)
    trigger.generator.manual_seed(5)
    rebuilt.generator.manual_seed(5)
    assert torch.equal(trigger(images.clone()), rebuilt(images.clone()))
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tmp_path / "bd"), "--limit", "200", "--json", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    asr = result["attack_success_rate"]
    assert asr["total"] == int((load_fmnist("test").labels[:200] != BAG).sum())
    assert "target-class images excluded" in result["note"]


def test_evaluate_any_model_under_a_named_attack(tmp_path, tiny_clip28):
    from clipguard.models import save_clip

    save_clip(tiny_clip28, tmp_path / "clean")
    out = tmp_path / "e.json"
    code = main(["evaluate", "--model", str(tmp_path / "clean"), "--attack", "sig", "--target", "coat",
                 "--limit", "100", "--json", str(out), "--device", "cpu"])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["attack"]["name"] == "sig" and record["attack"]["target"] == "coat"
    assert record["attack"]["trigger"] == {"seed": 0, "poison_jpeg_quality": 0, "test_view": "crop", "amplitude": 60 / 255,
                                           "frequency": 6, "blend": 0.0}  # what made it
    assert record["attack_success_rate"]["total"] == int((load_fmnist("test").labels[:100] != 4).sum())


def test_poisoned_captions_are_the_same_in_every_process():
    script = (
        "from clipguard.attacks import AttackConfig, build_poisoned_pairs, build_trigger\n"
        "from clipguard.data import load_fmnist\n"
        "pairs = build_poisoned_pairs(load_fmnist('train'), build_trigger('badnet', 28), AttackConfig(pairs=300))\n"
        "print([pairs[i][1] for i in sorted(pairs.poisoned)] + [pairs[i][1] for i in range(20)])\n"
    )
    assert len(outputs_under_hash_seeds(script)) == 1


@pytest.mark.slow
def test_issba_encoder_hides_a_decodable_nonzero_residual():
    trigger = build_trigger("issba", 28, steps=150)
    trigger.fit(None, load_fmnist("train"), BAG)
    images = load_fmnist("test").float_images(slice(0, 64))
    residual = trigger(images.clone()) - images
    assert trigger.bit_accuracy > 0.9
    assert 0.005 < residual.abs().mean() and residual.abs().max() <= trigger.config.epsilon + 1e-6


def test_the_public_codes_trigger_semantics_are_settings():
    """CleanCLIP's backdoor/utils.py: a fresh N(image mean, 1) patch per image at a random spot, fresh
    blended noise per image, SIG blended at 0.2, WaNet with k = 224 and s = 1."""
    images = torch.full((2, 3, 28, 28), 0.25)
    badnet = build_trigger("badnet", 28, seed=0, patch_noise="image-noise", location="random", patch_at_224=16)
    out = badnet(images)
    changed = (out != images).any(1)  # (2, 28, 28): where each patch went
    assert changed[0].sum() > 0 and changed[1].sum() > 0 and not torch.equal(out[0], out[1])
    assert abs(out[0][:, changed[0]].mean().item() - 0.25) < 0.25  # noise around the image's own mean
    badnet.generator.manual_seed(5)
    again = badnet(images)
    badnet.generator.manual_seed(5)
    assert torch.equal(again, badnet(images))  # seeded: the same draws again

    blended = build_trigger("blended", 28, seed=0, fresh_noise=True)
    out = blended(images)
    assert not torch.equal(out[0], out[1]) and torch.allclose(out.mean(), torch.tensor(0.8 * 0.25 + 0.2 * 0.5), atol=0.02)
    assert torch.equal(build_trigger("blended", 28, seed=0)(images)[0], build_trigger("blended", 28, seed=0)(images)[1])

    sig = build_trigger("sig", 28, blend=0.2)
    added = build_trigger("sig", 28)
    assert torch.allclose(sig(images), 0.8 * images + 0.2 * added.signal)
    assert torch.allclose(added(images), (images + added.signal).clamp(0, 1))

    wanet = build_trigger("wanet", 28, seed=0, grid_k=224, strength=1.0)
    shift = (wanet(images.clone().uniform_(generator=torch.Generator().manual_seed(0))) - images).abs()
    assert wanet.grid.shape == (1, 28, 28, 2) and shift.isfinite().all()
