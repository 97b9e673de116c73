import json

import pytest
import torch

from clipguard import ClipguardError
from clipguard.cli import main
from clipguard.data import DefenderData, few_shot_indices, load_fmnist
from clipguard.defenses import DEFENSES, get_defense_class, load_defense
from clipguard.defenses.rvpt import RVPTTask, alpha_at, feature_repelling_loss
from clipguard import pipeline
from clipguard.models import load_clip, save_clip
from clipguard.models.view import DefendedClip

from conftest import TINY28, make_tiny_clip

FAST = {"rvpt": dict(epochs=3, batch_size=10, prompt_length=4, start_block=1, lr=0.05),
        "vpt": dict(epochs=3, batch_size=10, prompt_length=4, start_block=1, lr=0.05),
        "coop": dict(steps=3, n_ctx=2, lr=0.05),
        "cbpt": dict(steps=3, n_ctx=2, lr=0.05, inversion_steps=3),
        "linear-probe": dict(epochs=3, batch_size=10, lr=0.05)}


def _shots(per_class=2, seed=0):
    train = load_fmnist("train")
    return train.subset(few_shot_indices(train.labels, per_class, seed, 10))


def _fit(name, clip, seed=0, **overrides):
    cls = get_defense_class(name)
    defense = cls(cls.config_class(device="cpu", seed=seed, **{**FAST[name], **overrides}), clip, load_fmnist("test").classes)
    stats = defense.fit(clip, _shots(seed=seed))
    return defense, stats


def test_feature_repelling_loss_known_values():
    x = torch.randn(4, 3, 8)
    assert feature_repelling_loss(x, x).item() == pytest.approx(1.0)
    assert feature_repelling_loss(x, -x).item() == pytest.approx(-1.0)
    y = x.clone().requires_grad_(True)
    loss = feature_repelling_loss(y, -x, margin=1.0)  # m = 1: a constant, i.e. plain VPT
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and y.grad.abs().sum() == 0


def test_centred_repulsion_sees_through_a_shared_component():
    shared = torch.full((1, 1, 8), 10.0)
    own = torch.randn(4, 2, 8)
    frozen, prompted = shared + own, shared - own  # image-specific parts point the opposite way
    assert feature_repelling_loss(prompted, frozen).item() > 0.9  # the shared part dominates
    centre = shared[0].expand(2, 8)
    assert feature_repelling_loss(prompted, frozen, centre=centre).item() == pytest.approx(-1.0, abs=1e-5)


def test_alpha_schedules_walk_from_start_to_end(monkeypatch, tiny_clip28):
    assert [alpha_at(2.0, "ramp", t, 5) for t in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [alpha_at(2.0, "decay", t, 5) for t in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert {alpha_at(2.0, "constant", t, 5) for t in range(5)} == {2.0}
    with pytest.raises(ValueError, match="alpha_schedule"):
        get_defense_class("rvpt").config_class(alpha_schedule="cosine")
    seen = []  # (step, total) of every training forward of a real fit
    original = RVPTTask.forward
    monkeypatch.setattr(RVPTTask, "forward", lambda self, batch: seen.append((self.step, self.total_steps))
                        or original(self, batch))
    _fit("rvpt", tiny_clip28, alpha_schedule="decay", epochs=3, batch_size=6)  # 20 shots: 3 steps per epoch
    assert seen == [(t, 9) for t in range(9)]


# ------------------------------------------------ the matrix: every registered defense, one contract
MATRIX_FAST = {**FAST,
               "cleanclip": dict(pairs=32, epochs=1, batch_size=16, warmup_steps=0),
               "finetune": dict(pairs=32, epochs=1, batch_size=16, warmup_steps=0),
               "par": dict(pairs=32, epochs=1, batch_size=16, warmup_steps=0),
               "oracle-repair": dict(epochs=1, batch_size=8, lr=1e-3, clean_ratio=1)}
POOL = "fmnist-test:24"


@pytest.fixture(autouse=True)
def planted_victims(monkeypatch):
    """Oracle repair's search (Algorithm 1-2, tested in test_oracle_repair) finds nothing on a random
    tiny CLIP; here it "finds" four bag victims, so the repair's fine-tune runs through the contract."""
    from clipguard.defenses.oracle_repair import repair
    from clipguard.defenses.oracle_repair.oracle import Region
    from clipguard.defenses.oracle_repair.trigger_search import TriggerCandidate

    def found(clip, pool_images, text_features, oracle, config):
        mask = torch.zeros(28, 28, dtype=torch.bool)
        mask[:4, :4] = True
        victims = [TriggerCandidate(i, Region(mask, (0, 0, 4, 4), "test"), 8, 0.9, 0.1, 6) for i in range(4)]
        predictions = torch.zeros(len(pool_images), dtype=torch.long)
        return predictions, victims, {"candidates": 4}, [8], {}, victims

    monkeypatch.setattr(repair, "_find_victims", found)


def _defend(name, clip, seed=0):
    return pipeline.defend(clip, name, shots=2, seed=seed, device="cpu", settings=MATRIX_FAST[name],
                           data=DefenderData(pool=POOL))


def _learned(defended) -> dict[str, torch.Tensor]:
    """What a defense learned: its own tensors, or the rewritten copy's weights."""
    source = defended.model if defended.defense.rewrites_weights else defended.defense
    return {k: v.detach().clone() for k, v in source.state_dict().items()}


def test_the_matrix_covers_every_registered_defense():
    assert set(MATRIX_FAST) == set(DEFENSES)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defense_changes_only_what_it_owns(name):
    clip = make_tiny_clip(architecture=TINY28)
    suspect = {k: v.clone() for k, v in clip.state_dict().items()}
    defended = _defend(name, clip)
    assert all(torch.equal(suspect[k], v) for k, v in clip.state_dict().items())  # the suspect is never changed
    learned = _learned(defended)
    if defended.defense.rewrites_weights:
        assert defended.model is not clip and defended.stats["trainable_parameters"] > 0
        assert any(not torch.equal(suspect[k], v) for k, v in learned.items())  # steps ran on the copy
    else:
        assert defended.model is clip
        assert defended.stats["trainable_parameters"] == defended.defense.trainable_parameters() > 0
        initial = get_defense_class(name)(defended.defense.config, clip, defended.defense.class_names).state_dict()
        assert any(not torch.equal(initial[k], v) for k, v in learned.items())  # steps ran on its own tensors


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_same_seed_same_defense(name):
    a, b, c = (_learned(_defend(name, make_tiny_clip(architecture=TINY28), seed)) for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_save_load_gives_identical_logits_and_refuses_mismatches(name, tmp_path, tiny_clip28):
    defended = _defend(name, tiny_clip28)
    pipeline.save(defended, tmp_path / "d")
    classes = load_fmnist("test").classes
    images = load_fmnist("test").float_images(slice(0, 16))
    if defended.defense.rewrites_weights:
        loaded = DefendedClip(load_clip(str(tmp_path / "d")))
        assert json.loads((tmp_path / "d" / "config.json").read_text())["format"] == "clipguard.model"
    else:
        loaded = DefendedClip(tiny_clip28, load_defense(tmp_path / "d", tiny_clip28, classes))
        assert json.loads((tmp_path / "d" / "config.json").read_text())["method"] == name
        with pytest.raises(ClipguardError, match="another backbone"):
            load_defense(tmp_path / "d", make_tiny_clip(seed=7, architecture=TINY28), classes)
        with pytest.raises(ClipguardError, match="learned for classes"):
            load_defense(tmp_path / "d", tiny_clip28, classes[::-1])
    with torch.inference_mode():
        assert torch.equal(defended.view.encode_image(images), loaded.encode_image(images))
        assert torch.equal(defended.view.class_features(classes), loaded.class_features(classes))


def test_repulsion_pushes_prompted_states_away_from_the_frozen_ones(tiny_clip28):
    from clipguard.models.prompted import frozen_prefix

    shots = _shots()
    pixels = tiny_clip28.preprocess(shots.float_images())
    prefix, frozen = frozen_prefix(tiny_clip28.model.visual, pixels, 1)
    similarity = {}
    for name, alpha in (("vpt", 0.0), ("rvpt", 2.0)):
        defense, _ = _fit("rvpt", tiny_clip28, alpha=alpha, epochs=10, lr=0.5, prompt_length=16)
        with torch.no_grad():
            _, states = defense.prompts(tiny_clip28.model.visual, prefix)
        similarity[name] = feature_repelling_loss(torch.stack(states, 1), frozen).item()
    assert similarity["rvpt"] < similarity["vpt"] - 0.05  # measured here: 0.83 vs 0.94


def test_defend_and_evaluate_cli_round_trip(tmp_path, tiny_clip28, capsys):
    save_clip(tiny_clip28, tmp_path / "m")
    code = main(["defend", "--model", str(tmp_path / "m"), "--method", "rvpt", "--shots", "1", "--device", "cpu",
                 "--set", "epochs=1", "--set", "prompt_length=2", "--set", "start_block=2", "--set", "batch_size=10",
                 "--attack", "badnet", "--target", "bag", "--out", str(tmp_path / "d")])
    assert code == 0
    saved = json.loads((tmp_path / "d" / "eval.json").read_text())
    out = tmp_path / "again.json"
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--defense", str(tmp_path / "d"), "--attack", "badnet",
                 "--target", "bag", "--json", str(out), "--device", "cpu"]) == 0
    again = json.loads(out.read_text())
    assert again["clean_accuracy"] == saved["clean_accuracy"]
    assert again["attack_success_rate"] == saved["attack_success_rate"]
    assert again["defense"] == "rvpt"
