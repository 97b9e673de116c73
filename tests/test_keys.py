"""Cache keys: derived from what builds each thing, unchanged where the thing did not change."""

import json
import sys
from pathlib import Path

import pytest

from clipguard import ClipguardError
from clipguard.attacks import ATTACKS
from clipguard.attacks.poison import attack_record, plan_attack, run_attack
from clipguard.bench import BenchConfig, attack_settings, backdoored_model, defense_settings, parse_bench_settings
from clipguard.cli import main
from clipguard.data import Captions, DefenderData, Labelled, Unlabelled
from clipguard.keys import attack_key, cell_key, record_key
from clipguard.models import save_clip
from conftest import TINY, make_tiny_clip

TINY_ATTACK = ["attack.pairs=64", "attack.train.epochs=1", "attack.train.batch_size=32", "attack.train.warmup_steps=0"]

# Keys the code before the key module gave (cell model key "M", seed 0; records from "builtin"):
# a user's runs/bench must not be retrained because the key's text changed.
VARIANTS = {
    "default": BenchConfig(), "limit": BenchConfig(limit=2000), "val": BenchConfig(dataset="fmnist-val"),
    "folder_pool": BenchConfig(pool="/data/pool", pool_size=500), "pool_n": BenchConfig(pool="fmnist-train:500"),
    "rate": BenchConfig(pool_trigger_rate=0.2), "web": BenchConfig(captions="fmnist-web"),
    "csvdata": BenchConfig(dataset="csv:/d/x.csv", csv_label_key="y"), "csvpool": BenchConfig(pool="csv:/d/p.csv"),
    "ramp": BenchConfig(defense_settings={"rvpt": {"alpha_schedule": "ramp"},
                                          "oracle-repair": {"region_groups": True}}),
}
OLD_CELL_KEYS = {
    "default/none": "32741d4ce038f2f7", "default/cbpt": "778c262214473575", "default/coop": "3e60c932d29ee146",
    "default/linear-probe": "06368c5e7fbb810f", "default/rvpt": "d774e0a736f83af5", "default/vpt": "13ddf5f6ff5918e0",
    "default/cleanclip": "521216ab5f71b66a", "default/finetune": "f4bf1339a2ba9e52",
    "default/oracle-repair": "c47bc0174c8875e7", "default/par": "ffc52bbebef563a9", "limit/rvpt": "ae4e503c7490f514",
    "val/vpt": "f8faf291dd49e64d", "folder_pool/oracle-repair": "525e4d9ead56891e",
    "pool_n/oracle-repair": "98e056e3f2d4f9ac", "rate/oracle-repair": "177a19e83ac5c175",
    "web/cleanclip": "e2932a60aa054184", "web/finetune": "2089619e51e3a6e3", "csvdata/coop": "a84681b522c71c7f",
    "csvpool/oracle-repair": "a33f689f8033e07d", "ramp/cbpt": "778c262214473575", "ramp/rvpt": "b07be885a413f6f5",
    "ramp/oracle-repair": "9a513c53f3af7e71",
}
OLD_RECORD_KEYS = {
    "badclip/0": "fc63ef3f24279377", "badnet/0": "d0106c054352da2d", "badnet/0/web": "83861c1df8a43aeb",
    "badnet/1": "14e5dc8f9187a0fc", "badnet-lc/0": "a3d1703b67360057", "blended/0": "abe20f1598a4514b",
    "blended/0/web": "55ce6041599a105c", "issba/0": "212bcf3fe89eaf4d", "sig/0": "cce28ca0b6225b6b",
    "trojvqa/0": "4a639987f1ae26bc", "wanet/0": "5639272cf38d0d98",
}


def bench_cell_key(config: BenchConfig, method: str) -> str:
    return cell_key("M", method, defense_settings(config, method, 0), config.limit, config.defender_data)


def test_cell_keys_of_the_default_bench_and_variants_are_the_old_ones():
    found = {name: bench_cell_key(VARIANTS[name.split("/")[0]], name.split("/")[1]) for name in OLD_CELL_KEYS}
    assert found == OLD_CELL_KEYS


def test_model_keys_are_the_old_ones_and_a_web_corpus_keys_its_28px_trigger():
    found = {}
    for name in OLD_RECORD_KEYS:
        attack, seed, *web = name.split("/")
        # a web corpus is 28 px whatever the model: a 224 px model gives the key a 28 px one gave
        found[name] = attack_key("builtin", 224 if web else 28, attack_settings(BenchConfig(), attack, int(seed)),
                                 data=DefenderData(captions="fmnist-web" if web else "fmnist"))
    assert found == OLD_RECORD_KEYS
    assert set(name.split("/")[0] for name in OLD_RECORD_KEYS) == set(ATTACKS)


def test_the_record_key_reads_every_identity_field_attack_record_writes():
    trigger, record = plan_attack(attack_settings(BenchConfig(), "badnet", 0))
    assert record == attack_record(trigger, attack_settings(BenchConfig(), "badnet", 0), tuple(record["classes"]))
    for field in set(record) - {"classes"}:
        changed = {**record, field: "other"}
        assert record_key("builtin", changed) != record_key("builtin", record), field
    assert record_key("builtin", {**record, "classes": ["x"]}) == record_key("builtin", record)


# ----------------------------------------------------------------- the pool's size
def test_the_cell_key_holds_the_pool_size_exactly_when_the_pool_reads_it():
    bare = [BenchConfig(pool="fmnist-train", pool_size=size) for size in (500, 1000)]
    assert bench_cell_key(bare[0], "oracle-repair") != bench_cell_key(bare[1], "oracle-repair")
    assert [c.pool_spec.count for c in bare] == [500, 1000]  # what the pool loader draws
    counted = BenchConfig(pool="fmnist-train:500")
    assert counted.pool_spec.count == 500
    assert bench_cell_key(counted, "oracle-repair") == bench_cell_key(BenchConfig(pool="fmnist-train:500",
                                                                                   pool_size=500), "oracle-repair")


def test_a_pool_size_the_pools_own_count_contradicts_is_refused(tmp_path, capsys):
    with pytest.raises(ClipguardError, match="names its own size"):
        BenchConfig(pool_size=500)  # the default pool is fmnist-train:2000
    assert BenchConfig(pool="fmnist-train:500", pool_size=500).pool_spec.count == 500
    assert BenchConfig().pool_spec.count == 2000 and BenchConfig(pool="/p").pool_spec.count == 2000
    assert main(["bench", "--pool-size", "500", "--out", str(tmp_path / "b")]) == 2
    assert "--pool-size 500 disagrees" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["defend", "--method", "oracle-repair", "--pool", "fmnist-test:40", "--pool-size", "20",
                 "--out", str(tmp_path / "d")]) == 2
    assert "give --pool fmnist-test:20" in capsys.readouterr().err
    assert Unlabelled("fmnist-test:8").load(28)[0].shape[0] == 8


def test_a_csv_pools_column_options_are_in_the_cell_key():
    keys = {bench_cell_key(BenchConfig(pool="csv:/d/p.csv", **options), "oracle-repair")
            for options in ({}, {"csv_img_key": "image"}, {"csv_separator": "\t"})}
    assert len(keys) == 3
    # a csv: labelled dataset's caption column changes nothing it reads
    assert (bench_cell_key(BenchConfig(pool="csv:/d/p.csv", csv_caption_key="text"), "oracle-repair")
            == bench_cell_key(BenchConfig(pool="csv:/d/p.csv"), "oracle-repair"))


def test_specs_key_only_what_changes_what_they_read():
    assert Labelled().key() == {} and Captions().key() == {}
    assert Labelled("fmnist", workers=4).key() == {} and Captions(workers=4).key() == {}
    assert Unlabelled("/p", 10, workers=3).key() == Unlabelled("/p", 10).key()
    assert "pool_size" not in Unlabelled("fmnist-test:10").key()
    with pytest.raises(ClipguardError, match="needs an unlabelled pool"):
        DefenderData().key("pool")


# --------------------------------------------------------- the model key and run_attack
def test_a_web_corpus_attack_on_a_16px_model_is_reused(tmp_path):
    save_clip(make_tiny_clip(architecture=TINY), tmp_path / "clean16")
    config = BenchConfig(model=str(tmp_path / "clean16"), attacks=["badnet"], captions="fmnist-web", device="cpu")
    config = parse_bench_settings(config, TINY_ATTACK)
    _, directory, key, made = backdoored_model(config, "badnet", 0, tmp_path / "out")
    saved = json.loads((directory / "config.json").read_text())
    assert saved["attack"]["image_size"] == 28 and made["cached"] is False
    assert record_key(saved.get("source", ""), saved["attack"]) == key
    assert backdoored_model(config, "badnet", 0, tmp_path / "out")[3]["cached"] is True


def test_run_attack_uses_the_planned_trigger_and_record(tiny_clip28):
    settings = parse_bench_settings(BenchConfig(), TINY_ATTACK).attack
    planned, record = plan_attack(settings, {"location": "random"}, image_size=tiny_clip28.image_size)
    _, trigger, made = run_attack(tiny_clip28, settings, {"location": "random"})
    assert trigger.config == planned.config and trigger.image_size == planned.image_size
    assert {k: made[k] for k in record} == record


# --------------------------------------------------------------------- benchmarks
def _benchmark(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))  # as `python benchmarks/X.py` sees its _tables
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_attack_table_gives_other_flags_another_folder(tmp_path):
    table = _benchmark("attack_table")
    plain = table.model_directory(tmp_path, "badnet", 0.03, [])
    assert plain == tmp_path / "badnet-0.03"  # as before: old folders are reused
    assert len({plain, table.model_directory(tmp_path, "badnet", 0.03, ["--pairs", "500"]),
                table.model_directory(tmp_path, "badnet", 0.03, ["--pairs", "600"])}) == 3


def test_the_cbpt_tables_cache_key_is_the_bench_cell_key_as_before(tmp_path):
    from clipguard import pipeline

    table = _benchmark("cbpt_table")
    settings = pipeline.defense_config("cbpt", 0, "cpu", 16, {})
    assert table.cache_path(tmp_path, "builtin", "cbpt", settings, None).name == "cbpt-92387823fcdff625.json"
    assert table.cache_path(tmp_path, "builtin", "none", {}, 100).name == "none-447a703d8ff63987.json"
    assert cell_key("builtin", "cbpt", settings, None) == "92387823fcdff625"
