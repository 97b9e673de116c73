import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipguard import ClipguardError
from clipguard.attacks import build_trigger
from clipguard.attacks.patch import patch_mask
from clipguard.data import load_fmnist
from clipguard.data.pool import load_pool
from clipguard.defenses.oracle_repair.oracle import (
    ClassicalOracle, Region, build_oracle, fill_regions, isolate_regions, mask_iou, paste_regions,
)
from clipguard.defenses.oracle_repair import (
    NO_TRIGGER, OracleRepairConfig, build_compact_set, expand_victims, oracle_repair, repair_finetune,
    save_repaired_model, victim_labels, write_repair_report,
)
from clipguard.defenses.oracle_repair.trigger_search import TriggerCandidate, find_trigger_candidates, log_odds
from clipguard.models import load_clip

from conftest import TINY28, make_tiny_clip, outputs_under_hash_seeds

CLASSES = ("shirt", "sandal", "bag")
SHIRT, SANDAL, BAG = range(3)


class HandMadeClip(nn.Module):
    """A 'CLIP' whose answer is known: 'bag' when the image holds >= 4 strongly coloured pixels
    (a visible trigger) or when fine noise covers most of it (an invisible trigger), 'shirt'
    when enough of it is bright, 'sandal' otherwise. Text features are one-hot per class."""

    def __init__(self, bag_max_bright: float = 1.0, bag_min_coloured: int = 4):
        super().__init__()
        self.bag_max_bright = bag_max_bright  # < 1: the coloured-patch rule only fires on small objects
        self.bag_min_coloured = bag_min_coloured  # coloured pixels the visible-trigger rule needs
        self.weight = nn.Parameter(torch.ones(3))  # only so that 'weights unchanged' can be checked
        self.config = {"classes": list(CLASSES)}

    @property
    def device(self):
        return self.weight.device

    @property
    def logit_scale(self):
        return torch.tensor(20.0)

    def encode_image(self, images, normalize=True):
        chroma = images.max(1).values - images.min(1).values  # (B, H, W)
        grey = images.mean(1)
        speckle = (grey - F.avg_pool2d(grey[:, None], 3, 1, 1)[:, 0]).abs() > 0.015  # (B, H, W)
        bright = (grey > 0.3).float().mean((1, 2))
        coloured = (chroma > 0.5).sum((1, 2))
        visible = (coloured >= self.bag_min_coloured) & (bright < self.bag_max_bright)
        is_bag = visible | (speckle.float().mean((1, 2)) > 0.5)
        is_shirt = bright > 0.15
        scores = torch.stack([is_shirt & ~is_bag, ~is_shirt & ~is_bag, is_bag], -1).float() + 0.05  # (B, 3)
        return F.normalize(scores * self.weight, dim=-1)

    def tokenize(self, texts):
        return torch.tensor([[next(i for i, c in enumerate(CLASSES) if c in t)] for t in texts])

    def encode_text(self, token_ids, normalize=True):
        return F.one_hot(token_ids[:, 0], len(CLASSES)).float()

    def eval(self):
        return self


def _shirt_images(n, seed=0):
    """Grey 'shirts': a bright rectangle on black, with a little texture."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, 28, 28)
    for i in range(n):
        top, left = torch.randint(3, 8, (2,), generator=g).tolist()
        images[i, :, top : top + 14, left : left + 12] = 0.5 + 0.2 * torch.rand(1, generator=g)
    return images


def _add_patch(images, top=22, left=22, side=4):
    out = images.clone()
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    patch = colours[torch.arange(side * side) % 4].T.reshape(3, side, side)  # (3, s, s) coloured noise
    out[:, :, top : top + side, left : left + side] = patch
    return out


def _true_mask(top=22, left=22, side=4):
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_classical_oracle_finds_a_planted_bright_square():
    image = _shirt_images(1)[0]
    image[:, 21:25, 2:6] = 1.0
    regions = ClassicalOracle().segment(image)
    truth = torch.zeros(28, 28, dtype=torch.bool)
    truth[21:25, 2:6] = True
    best = max(regions, key=lambda r: mask_iou(r.mask, truth))
    assert mask_iou(best.mask, truth) == 1.0 and best.box == (21, 2, 25, 6)


def test_classical_oracle_finds_the_badnet_patch_on_fashion_mnist():
    images = load_fmnist("test").float_images(slice(0, 20))
    triggered = build_trigger("badnet", 28, seed=0)(images)
    truth = patch_mask(28, 4, "corner")
    best = [max(mask_iou(r.mask, truth) for r in ClassicalOracle().segment(x)) for x in triggered]
    assert sum(iou >= 0.5 for iou in best) >= 19


def test_fill_and_isolate_known_values():
    images = torch.zeros(1, 3, 6, 6)
    images[0, :, 2:4, 2:4] = 1.0
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 2:4, 2:4] = True
    assert fill_regions(images, mask).abs().max() == 0  # the band around the square is black
    alone = isolate_regions(images + 0.5, mask, torch.full((1, 3), 0.25))
    assert alone[0, 0, 2, 2] == 1.5 and alone[0, 0, 0, 0] == 0.25
    pasted = paste_regions(images, mask, torch.full_like(images, 0.5))
    assert pasted[0, 0, 2, 2] == 1.0 and pasted[0, 0, 0, 0] == 0.5


def test_candidate_is_the_trigger_and_clean_images_give_none():
    clip, texts = HandMadeClip(), torch.eye(3)
    clean = _shirt_images(6)
    pool = torch.cat([_add_patch(clean[:3]), clean[3:]])
    predictions, candidates, stats = find_trigger_candidates(clip, pool, texts, ClassicalOracle(), OracleRepairConfig())
    assert predictions.tolist() == [BAG] * 3 + [SHIRT] * 3
    assert [c.image for c in candidates] == [0, 1, 2]
    for c in candidates:
        assert c.label == BAG and c.repaired_label == SHIRT
        assert mask_iou(c.region.mask, _true_mask()) >= 0.5
    assert stats["regions_tested"] > len(candidates)


def test_a_region_that_does_not_transfer_is_not_a_candidate():
    """(a)-(c) hold for the patch on small objects, but pasted on big ones it reads nothing: (d) rejects it."""
    clip = HandMadeClip(bag_max_bright=0.2)
    small = torch.zeros(4, 3, 28, 28)
    small[:, :, 4:14, 4:16] = 0.6  # 120 px: 15% bright
    pool = torch.cat([_add_patch(small), _shirt_images(20)])
    predictions, candidates, stats = find_trigger_candidates(clip, pool, torch.eye(3), ClassicalOracle(),
                                                             OracleRepairConfig())
    assert predictions[:4].eq(BAG).all() and stats["passed_flip"] >= 4
    assert candidates == []
    patched_shirts = _add_patch(_shirt_images(3))
    assert clip.encode_image(patched_shirts).argmax(-1).eq(SHIRT).all()  # the reason: it does not transfer


def test_a_trigger_in_four_parts_is_found_as_their_union():
    """Four 3x3 corner patches; 'bag' needs all 36 coloured pixels. No part alone reads bag and
    none transfers, so only the union of the parts that each lower p(bag) is a candidate."""
    clip = HandMadeClip(bag_min_coloured=36)
    corners = [(1, 1), (1, 24), (24, 1), (24, 24)]
    clean = _shirt_images(12)
    pool = clean.clone()
    for top, left in corners:
        pool[:4] = _add_patch(pool[:4], top, left, side=3)
    truth = torch.stack([_true_mask(top, left, 3) for top, left in corners]).any(0)
    predictions, candidates, _ = find_trigger_candidates(clip, pool, torch.eye(3), ClassicalOracle(),
                                                         OracleRepairConfig())
    assert predictions.tolist() == [BAG] * 4 + [SHIRT] * 8 and candidates == []
    config = OracleRepairConfig(region_groups=True)
    _, candidates, stats = find_trigger_candidates(clip, pool, torch.eye(3), ClassicalOracle(), config)
    assert [c.image for c in candidates] == [0, 1, 2, 3] and stats["groups_tested"] >= 4
    for c in candidates:
        assert c.region.source == "group" and c.repaired_label == SHIRT and c.transfer_rate == 1.0
        assert mask_iou(c.region.mask, truth) >= 0.5


def test_log_odds_are_exact_where_the_probability_saturates():
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert logits.softmax(-1)[0, 0] == 1.0  # float32: the probability no longer moves
    values = log_odds(logits.log_softmax(-1), torch.tensor([0, 1]))
    expected = torch.tensor([30.0 - torch.log(torch.tensor(2.0)), 2.0 - torch.log(torch.tensor(2.0))])
    assert torch.allclose(values, expected, atol=1e-5)


def test_a_real_bag_is_not_a_candidate():
    """The 'trigger' colour covers the whole object: removing one part leaves a bag, (b) holds it back."""
    bag = _shirt_images(1)
    bag[:, 0, 5:18, 5:17], bag[:, 1:, 5:18, 5:17] = 1.0, 0.0  # a red object
    bag[:, :, 8:12, 8:12] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # with a green spot
    _, candidates, _ = find_trigger_candidates(HandMadeClip(), bag, torch.eye(3), ClassicalOracle(), OracleRepairConfig())
    assert candidates == []


def test_expanded_victims_carry_the_found_trigger_and_a_real_bag_is_not_one():
    """One victim's region, masked on the other images read as bag, flips the patched shirts only."""
    bag = _shirt_images(1, seed=1)
    bag[:, 0, 5:18, 5:17], bag[:, 1:, 5:18, 5:17] = 1.0, 0.0  # a red object: a real bag
    pool = torch.cat([_add_patch(_shirt_images(4)), bag, _shirt_images(3, seed=2)])
    clip, texts = HandMadeClip(), torch.eye(3)
    predictions = clip.encode_image(pool).argmax(-1)
    assert predictions.tolist() == [BAG] * 5 + [SHIRT] * 3
    found = [TriggerCandidate(0, Region(_true_mask(), (22, 22, 26, 26), "test"), BAG, 0.9, 0.1, SHIRT)]
    expanded = expand_victims(clip, pool, predictions, found, found, texts, OracleRepairConfig())
    assert [e.image for e in expanded] == [1, 2, 3]
    for e in expanded:
        assert e.expanded and e.label == BAG and e.repaired_label == SHIRT and e.crop_probability > 0.7
        assert torch.equal(e.region.mask, _true_mask())


def test_clean_pairs_never_hold_a_victim_even_one_without_a_candidate():
    images = torch.rand(12, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    expanded = [_candidate(i, BAG) for i in range(3)]  # victims that Algorithm 1 gave no candidate
    config = OracleRepairConfig(clean_ratio=10)
    pairs, sizes = build_compact_set(images, torch.zeros(12, dtype=torch.long), [], expanded, CLASSES, config)
    assert sizes == {"victim_pairs": 3, "clean_pairs": 9}  # all 9 others, none of the 3 victims again
    clean = pairs.images[3:]
    assert not any(torch.equal(c, images[i]) for c in clean for i in range(3))


def _candidate(image, label):
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[0, 0] = True
    return TriggerCandidate(image, Region(mask, (0, 0, 1, 1), "test"), label, 0.9, 0.1, SHIRT)


def test_victim_label_must_be_far_above_chance():
    predictions = torch.tensor([SHIRT] * 80 + [BAG] * 20)
    pointing = [_candidate(i, BAG) for i in range(15)] + [_candidate(20 + i, SHIRT) for i in range(3)]
    victims, tests = victim_labels(pointing, predictions, 3, 1e-3, 5)
    assert victims == [BAG] and tests[BAG]["candidates"] == 15
    spread = [_candidate(i, SHIRT) for i in range(8)] + [_candidate(50 + i, BAG) for i in range(2)]
    assert victim_labels(spread, predictions, 3, 1e-3, 5)[0] == []


def test_invisible_trigger_gives_the_verdict_and_leaves_weights_unchanged(tmp_path):
    clean = _shirt_images(40)
    noise = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0))
    pool = torch.cat([clean[:30], 0.8 * clean[30:] + 0.2 * noise])  # Blended: a bag everywhere, nowhere in particular
    clip = HandMadeClip()
    assert clip.encode_image(pool[30:]).argmax(-1).eq(BAG).all()
    before = clip.weight.detach().clone()
    repaired, report = oracle_repair(clip, pool, OracleRepairConfig(device="cpu"))
    assert repaired is clip and torch.equal(clip.weight, before)
    assert report["verdict"] == NO_TRIGGER and report["model_changed"] is False and report["victims"] == 0
    assert report["retried_with_groups"] and report["config"]["region_groups"]  # the search in parts found none either
    _, once = oracle_repair(clip, pool, OracleRepairConfig(device="cpu", retry_with_groups=False))
    assert not once["retried_with_groups"] and once["groups_tested"] == 0 and once["verdict"] == NO_TRIGGER
    paths = write_repair_report(report, pool, tmp_path)
    assert paths["examples"] is None and json.loads((tmp_path / "repair.json").read_text())["verdict"] == NO_TRIGGER


def test_compact_set_and_finetune_change_the_model(tmp_path):
    clip = make_tiny_clip(architecture=TINY28)
    clip.config["attack"] = {"name": "badnet", "target": "bag"}
    images = load_fmnist("test").float_images(slice(0, 12))
    victims = [_candidate(i, BAG) for i in range(3)]
    config = OracleRepairConfig(epochs=1, batch_size=6, lr=1e-3, device="cpu", clean_ratio=1)
    pairs, sizes = build_compact_set(images, torch.zeros(12, dtype=torch.long), victims, victims, CLASSES, config)
    assert sizes == {"victim_pairs": 3, "clean_pairs": 3} and len(pairs) == 6
    assert pairs[0][1].count("shirt") == 1  # victims are captioned with their repaired label
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    clip, finetune = repair_finetune(clip, pairs, config)
    assert finetune["steps"] == 1
    assert any(not torch.equal(before[k], v) for k, v in clip.state_dict().items())
    (tmp_path / "suspect").mkdir()
    from safetensors.torch import save_file
    save_file({"patch": torch.ones(3, 4, 4)}, str(tmp_path / "suspect" / "trigger.safetensors"))
    saved = save_repaired_model(clip, {"verdict": "x", "victim_samples": []}, tmp_path / "out", tmp_path / "suspect")
    config_json = json.loads((saved / "config.json").read_text())
    assert config_json["attack"]["name"] == "badnet" and config_json["repair"] == {"verdict": "x"}
    assert (saved / "trigger.safetensors").is_file()
    reloaded = load_clip(str(saved))
    x = torch.rand(2, 3, 28, 28)
    assert torch.allclose(reloaded.encode_image(x), clip.encode_image(x), atol=1e-5)


def test_vision_only_repair_leaves_the_text_tower_untouched():
    clip = make_tiny_clip(architecture=TINY28)
    images = load_fmnist("test").float_images(slice(0, 12))
    victims = [_candidate(i, BAG) for i in range(3)]
    config = OracleRepairConfig(epochs=1, batch_size=6, lr=1e-3, device="cpu", tune="vision")
    pairs, _ = build_compact_set(images, torch.zeros(12, dtype=torch.long), victims, victims, CLASSES, config)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    repaired, _ = repair_finetune(clip, pairs, config)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())  # the suspect is not changed
    changed = {k for k, v in repaired.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("model.visual.") for k in changed)
    assert not any(p.requires_grad for p in repaired.parameters())  # frozen again afterwards


def test_repair_captions_are_the_same_in_every_process():
    script = (
        "import torch\n"
        "from clipguard.defenses.oracle_repair import RepairPairs\n"
        "pairs = RepairPairs(torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(0)),"
        " torch.arange(8) % 3, ['shirt', 'sandal', 'bag'], seed=0)\n"
        "print([pairs[i][1] for i in range(8)])\n"
    )
    assert len(outputs_under_hash_seeds(script)) == 1


def test_fastsam_without_weights_or_package_fails_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(ClipguardError, match="ultralytics") as err:
        build_oracle("fastsam")
    assert "\n" not in str(err.value)
    weights = tmp_path / "FastSAM-s.pt"
    weights.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "ultralytics", None)  # import fails as if not installed
    with pytest.raises(ClipguardError, match="pip install ultralytics"):
        build_oracle("fastsam", weights=str(weights))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="crop_confidence"):
        OracleRepairConfig(crop_confidence=1.5)
    with pytest.raises(ValueError, match="tune"):
        OracleRepairConfig(tune="text")
    with pytest.raises(ClipguardError, match="proposals"):
        build_oracle("classical", proposals=("watershed",))


def test_load_pool_mixes_in_the_trigger_at_the_stated_rate(tmp_path):
    trigger = build_trigger("badnet", 28, seed=0)
    clean, info = load_pool("fmnist-test:10", 28, seed=3)
    pool, info = load_pool("fmnist-test:10", 28, seed=3, trigger=trigger, trigger_rate=0.3)
    assert pool.shape == (10, 3, 28, 28) and len(info["triggered"]) == 3
    changed = (pool - clean).abs().amax((1, 2, 3)) > 0
    assert torch.nonzero(changed).flatten().tolist() == info["triggered"]
    with pytest.raises(ClipguardError, match="fmnist-train:N"):
        load_pool(str(tmp_path / "missing"), 28)
