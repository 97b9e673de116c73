"""The defenses that rewrite the suspect's weights share one fine-tune and one save (defenses/weights.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipguard.data import FMNIST_CLASSES, load_fmnist
from clipguard.defenses import DEFENSES, get_defense_class
from clipguard.defenses import weights
from clipguard.defenses.base import Pool
from clipguard.defenses.weights import WeightFinetune
from clipguard.models import load_clip
from clipguard.outputs import atomic_write

from conftest import TINY28, make_tiny_clip

REWRITING = ("cleanclip", "finetune", "oracle-repair", "par")
FAST = {"cleanclip": dict(pairs=16, epochs=1, batch_size=16, warmup_steps=0, lr=1e-3, device="cpu"),
        "finetune": dict(pairs=16, epochs=1, batch_size=16, warmup_steps=0, lr=1e-3, device="cpu"),
        "par": dict(pairs=16, epochs=1, batch_size=16, warmup_steps=0, lr=1e-3, device="cpu"),
        "oracle-repair": dict(epochs=1, batch_size=8, lr=1e-3, clean_ratio=1, device="cpu")}


@pytest.fixture(autouse=True)
def planted_victims(monkeypatch):
    """Oracle repair's search finds nothing on a random tiny CLIP; here it "finds" four bag
    victims (as in test_defenses), so its fine-tune runs."""
    from clipguard.defenses.oracle_repair import repair
    from clipguard.defenses.oracle_repair.oracle import Region
    from clipguard.defenses.oracle_repair.trigger_search import TriggerCandidate

    def found(clip, pool_images, text_features, oracle, config):
        mask = torch.zeros(28, 28, dtype=torch.bool)
        mask[:4, :4] = True
        victims = [TriggerCandidate(i, Region(mask, (0, 0, 4, 4), "test"), 8, 0.9, 0.1, 6) for i in range(4)]
        return torch.zeros(len(pool_images), dtype=torch.long), victims, {"candidates": 4}, [8], {}, victims

    monkeypatch.setattr(repair, "_find_victims", found)


def _fitted(name: str, clip):
    cls = get_defense_class(name)
    defense = cls(cls.config_class(**FAST[name]), clip, FMNIST_CLASSES)
    pool = Pool(load_fmnist("test").float_images(slice(0, 24)), {"spec": "fmnist-test:24"})
    stats = defense.fit(clip, pool if cls.data == "pool" else None)
    return defense, stats


def test_every_weight_rewriting_defense_is_a_weight_finetune():
    rewriting = sorted(name for name, cls in DEFENSES.items() if cls.rewrites_weights)
    assert rewriting == sorted(REWRITING)
    assert all(issubclass(DEFENSES[name], WeightFinetune) for name in rewriting)
    assert not any(issubclass(cls, WeightFinetune) for cls in DEFENSES.values() if not cls.rewrites_weights)


@pytest.mark.parametrize("name", REWRITING)
def test_each_weight_rewriting_defense_trains_through_the_one_finetune_copy(monkeypatch, name):
    calls = []

    class Stop(Exception):
        pass

    def spy(task, dataset, config, *args, **kwargs):
        calls.append((kwargs["desc"], task.clip))
        raise Stop

    monkeypatch.setattr(weights, "fit", spy)  # the engine as finetune_copy sees it
    clip = make_tiny_clip(architecture=TINY28)
    with pytest.raises(Stop):
        _fitted(name, clip)
    assert [desc for desc, _ in calls] == [name.replace("-", " ")]
    tuned = calls[0][1]
    assert tuned is not clip and not any(p.requires_grad for p in tuned.parameters())  # a copy, frozen again


@pytest.mark.parametrize("name", REWRITING)
def test_the_saved_model_keeps_the_suspects_trigger_and_attack_record(tmp_path, name):
    suspect = make_tiny_clip(architecture=TINY28)
    suspect.config["attack"] = {"name": "badnet", "target": "bag"}
    before = {k: v.clone() for k, v in suspect.state_dict().items()}
    source = tmp_path / "suspect"
    source.mkdir()
    trigger = {"patch": torch.arange(48.0).view(3, 4, 4)}
    save_file(trigger, str(source / "trigger.safetensors"))
    defense, stats = _fitted(name, suspect)
    assert all(torch.equal(before[k], v) for k, v in suspect.state_dict().items())  # a copy was tuned
    assert any(not torch.equal(before[k], v) for k, v in defense.model.state_dict().items())
    saved = defense.save(suspect, tmp_path / "out", stats, source)
    assert torch.equal(load_file(str(saved / "trigger.safetensors"))["patch"], trigger["patch"])
    config = json.loads((saved / "config.json").read_text())
    assert config["attack"] == {"name": "badnet", "target": "bag"}
    assert ("repair" if name == "oracle-repair" else "defense") in config
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(load_clip(str(saved)).encode_image(x), defense.model.encode_image(x), atol=1e-5)
    # without the suspect's directory there is no trigger to keep
    assert not (defense.save(suspect, tmp_path / "bare", stats) / "trigger.safetensors").exists()


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.md"
    atomic_write(path, lambda tmp: tmp.write_text("first"))
    assert path.read_text() == "first"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "first" and sorted(p.name for p in path.parent.iterdir()) == ["results.md"]
    atomic_write(path, lambda tmp: tmp.write_text("second"), temporary=".results.tmp.md")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["results.md"]
