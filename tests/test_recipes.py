"""recipes/: each parses into its config and runs two steps on tiny data (the sizes overridden)."""

import json
from pathlib import Path

from PIL import Image

from clipguard.attacks import AttackConfig
from clipguard.bench import BenchConfig
from clipguard.cli import main
from clipguard.config import load_config
from clipguard.defenses.cleanclip import CleanCLIPConfig

from conftest import webdataset_shards

RECIPES = Path(__file__).parent.parent / "recipes"
PUBLIC, CLEANCLIP = RECIPES / "public-protocol.yaml", RECIPES / "cleanclip.yaml"


def _imagenet_subset(root: Path) -> str:
    """Synset folders of tench, goldfish and banana (3 grey-level images each)."""
    for k, synset in enumerate(("n01440764", "n01443537", "n07753592")):
        (root / synset).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (60 * k + 20 * i, 90, 30)).save(root / synset / f"{i}.jpg")
    return f"imagenet:{root}"


def test_the_public_protocol_recipe_holds_the_papers_numbers():
    bench = load_config(BenchConfig, PUBLIC)
    attack = load_config(AttackConfig, PUBLIC, section="attack")
    assert attack == bench.attack
    assert (attack.target, attack.pairs, round(attack.poison_rate * attack.pairs)) == ("banana", 500_000, 1500)
    train = attack.train
    assert (train.optimizer, train.lr, train.epochs, train.batch_size) == ("adamw", 1e-6, 5, 128)
    assert bench.shots == 16
    cleanclip = load_config(CleanCLIPConfig, CLEANCLIP)
    assert (cleanclip.pairs, cleanclip.lr, cleanclip.epochs, cleanclip.batch_size) == (100_000, 1e-5, 10, 64)
    assert bench.defense_settings["cleanclip"] == {"pairs": 100_000, "lr": 1e-5, "epochs": 10, "batch_size": 64,
                                                   "warmup_steps": 50}


def test_the_public_protocol_runs_two_steps_on_tiny_data(tmp_path, model_dir, capsys):
    shards = webdataset_shards(tmp_path / "wds", 256, shards=2)
    dataset = _imagenet_subset(tmp_path / "imagenet")
    out = tmp_path / "badnet"
    assert main(["attack", "--config", str(PUBLIC), "--model", str(model_dir), "--attack", "badnet",
                 "--captions", f"wds:{shards}", "--dataset", dataset, "--pairs", "256", "--epochs", "1",
                 "--workers", "2", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["attack"]
    assert (record["steps"], record["poisoned_pairs"], record["target"]) == (2, 1, "banana")
    assert record["train"]["lr"] == 1e-6 and record["train"]["batch_size"] == 128
    assert "banana" in record["classes"] and "tench" in record["classes"]  # OpenAI's names, by synset
    assert "ASR" in capsys.readouterr().out


def test_the_cleanclip_recipe_runs_two_steps_on_tiny_data(tmp_path, model_dir):
    shards = webdataset_shards(tmp_path / "wds", 128, shards=2)
    out = tmp_path / "cleaned"
    assert main(["defend", "--method", "cleanclip", "--config", str(CLEANCLIP), "--model", str(model_dir),
                 "--captions", f"wds:{shards}", "--set", "pairs=128", "--set", "epochs=1", "--workers", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    stats = json.loads((out / "config.json").read_text())["defense"]
    assert (stats["steps"], stats["pairs"], stats["config"]["lr"], stats["config"]["batch_size"]) == (2, 128, 1e-5, 64)


def test_the_broad_builtin_recipe_holds_out_the_validation_images():
    from clipguard.data.web import CORPUS_IMAGES
    from clipguard.models.builtin import BuiltinRecipe

    recipe = load_config(BuiltinRecipe, RECIPES / "builtin-broad.yaml")
    assert (recipe.corpus, recipe.train_images) == ("fmnist+web", CORPUS_IMAGES)
    assert recipe.train.epochs == 5


def test_the_light_recipe_backdoors_through_plain_and_web_pairs(tmp_path, model_dir):
    bench = load_config(BenchConfig, RECIPES / "builtin-light.yaml")
    attack = load_config(AttackConfig, RECIPES / "builtin-light.yaml", section="attack")
    assert attack == bench.attack and (attack.pairs, attack.poison_rate, attack.target) == (10_000, 0.03, "bag")
    assert (attack.train.lr, attack.train.epochs) == (5e-5, 5)
    assert (bench.model, bench.captions, bench.dataset) == ("builtin-broad", "fmnist-web:plain=0.7", "fmnist-val")
    out = tmp_path / "light"
    assert main(["attack", "--config", str(RECIPES / "builtin-light.yaml"), "--model", str(model_dir), "--attack", "badnet",
                 "--captions", bench.captions, "--dataset", bench.dataset, "--pairs", "256", "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["attack"]
    assert record["steps"] == 1  # one batch of 256 pairs
    assert (record["captions"], record["poisoned_pairs"], record["train"]["lr"]) == ("fmnist-web:plain=0.7", 8, 5e-5)
