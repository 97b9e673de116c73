"""The benchmark matrix: cells, cache keys, resume after an interruption, the report."""

import json

import pytest

from clipguard import ClipguardError, bench
from clipguard.bench import BenchConfig, parse_bench_settings, run_bench
from clipguard.cli import main
from clipguard.data import load_fmnist
from clipguard.eval.report import markdown_table
from clipguard.eval.tables import mean_std
from clipguard.models import save_clip
from conftest import TINY28, make_tiny_clip

TINY_ATTACK = ["attack.pairs=64", "attack.train.epochs=1", "attack.train.batch_size=32", "attack.train.warmup_steps=0"]


def tiny_config(model: str, **changes) -> BenchConfig:
    config = BenchConfig(model=model, attacks=["badnet"], defenses=["none", "vpt"], seeds=[0], shots=1, limit=60,
                         pr_images=0, device="cpu", **changes)
    return parse_bench_settings(config, TINY_ATTACK + ["vpt.epochs=1", "vpt.prompt_length=2"])


@pytest.fixture
def tiny_model(tmp_path):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "clean")
    return str(tmp_path / "clean")


def test_matrix_writes_one_record_per_cell_and_the_report(tmp_path, tiny_model):
    records = run_bench(tiny_config(tiny_model), tmp_path / "out")
    assert [(r["attack"], r["defense"], r["seed"]) for r in records] == [("badnet", "none", 0), ("badnet", "vpt", 0)]
    non_target = int((load_fmnist("test").labels[:60] != 8).sum())  # 8 = bag, the default target
    for record in records:
        asr = record["attack_success_rate"]
        assert asr["total"] == record["poisoned_accuracy"]["total"] == non_target < 60
        assert 0 <= asr["hits"] <= asr["total"] and record["clean_accuracy"]["total"] == 60
    assert records[0]["trainable_parameters"] == 0 < records[1]["trainable_parameters"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["cells"]) == 2 and "excluded" in saved["note"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| badnet |" in table and "excluded" in table
    assert not (tmp_path / "out" / "runs").exists()  # finished fine-tunes leave no checkpoints, nor an empty folder
    for name in ("report.html", "asr_ca.png", "triggers.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_interrupted_run_resumes_without_recomputing_finished_work(tmp_path, tiny_model, monkeypatch):
    config = tiny_config(tiny_model)
    real_defend = bench.defend

    def crash_on_vpt(suspect, method, *args, **kwargs):
        if method == "vpt":
            raise KeyboardInterrupt  # the user kills the run during the second cell
        return real_defend(suspect, method, *args, **kwargs)

    monkeypatch.setattr(bench, "defend", crash_on_vpt)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, tmp_path / "out")
    assert (tmp_path / "out" / "cells" / "badnet-s0" / "none.json").is_file()
    assert not (tmp_path / "out" / "cells" / "badnet-s0" / "vpt.json").exists()
    first = json.loads((tmp_path / "out" / "cells" / "badnet-s0" / "none.json").read_text())

    calls = []
    monkeypatch.setattr(bench, "defend", lambda clip, method, *a, **k: calls.append(method) or real_defend(clip, method, *a, **k))
    monkeypatch.setattr(bench, "run_attack", lambda *a, **k: pytest.fail("the backdoored model was recomputed"))
    records = run_bench(config, tmp_path / "out")
    assert calls == ["vpt"]  # only the unfinished cell
    assert records[0] == first

    calls.clear()
    run_bench(config, tmp_path / "out")  # everything finished: nothing at all is recomputed
    assert calls == []


def test_changed_settings_invalidate_only_the_cells_they_touch(tmp_path, tiny_model, monkeypatch):
    run_bench(tiny_config(tiny_model), tmp_path / "out")
    calls = []
    real_defend = bench.defend
    monkeypatch.setattr(bench, "defend", lambda clip, method, *a, **k: calls.append(method) or real_defend(clip, method, *a, **k))
    monkeypatch.setattr(bench, "run_attack", lambda *a, **k: pytest.fail("the backdoored model was recomputed"))
    changed = parse_bench_settings(tiny_config(tiny_model), ["vpt.lr=0.5"])
    run_bench(changed, tmp_path / "out")
    assert calls == ["vpt"]


def test_same_seed_gives_the_same_numbers(tmp_path, tiny_model):
    one = run_bench(tiny_config(tiny_model), tmp_path / "a")
    two = run_bench(tiny_config(tiny_model), tmp_path / "b")
    metrics = ("clean_accuracy", "attack_success_rate", "poisoned_accuracy")
    assert [[r[m] for m in metrics] for r in one] == [[r[m] for m in metrics] for r in two]


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown"):
        BenchConfig(attacks=["nope"])
    with pytest.raises(ClipguardError, match="neither"):
        parse_bench_settings(BenchConfig(), ["rvqt.lr=1"])
    with pytest.raises(ClipguardError, match="FIELD"):
        parse_bench_settings(BenchConfig(), ["rvpt.lrr=1"])
    assert parse_bench_settings(BenchConfig(), ["attack.train.epochs=2"]).attack.train.epochs == 2


def test_an_added_setting_at_its_old_behaviour_keeps_old_cell_keys():
    from dataclasses import asdict

    from clipguard.defenses.rvpt import RVPTConfig
    from clipguard.keys import cell_key

    settings = asdict(RVPTConfig(seed=0))
    before = {k: v for k, v in settings.items() if k != "alpha_schedule"}  # as cached before the option existed
    assert cell_key("m", "rvpt", settings, None) == cell_key("m", "rvpt", before, None)
    ramp = {**settings, "alpha_schedule": "ramp"}
    assert cell_key("m", "rvpt", ramp, None) != cell_key("m", "rvpt", before, None)


def test_markdown_table_gives_mean_and_std_over_seeds():
    def cell(seed, asr, ca):
        rate = lambda v: {"value": v}  # noqa: E731
        return {"attack": "badnet", "defense": "rvpt", "seed": seed, "attack_success_rate": rate(asr),
                "clean_accuracy": rate(ca), "poisoned_accuracy": rate(0.0), "test_images": 100,
                "defense_seconds": 1.0, "peak_memory_mb": 10.0, "trainable_parameters": 5}

    table = markdown_table([cell(0, 0.10, 0.80), cell(1, 0.20, 0.90), cell(2, 0.30, 1.00)])
    assert "| badnet | 20.00±10.00 (90.00±10.00) n=3 |" in table
    assert mean_std([1.0]) == (1.0, 0.0)


def test_bench_cli_prints_the_table(tmp_path, tiny_model, capsys):
    code = main(["bench", "--model", tiny_model, "--attacks", "badnet", "--defenses", "none", "--shots", "1",
                 "--limit", "40", "--pr-images", "0", "--device", "cpu", "--out", str(tmp_path / "out"),
                 *[x for item in TINY_ATTACK for x in ("--set", item)]])
    assert code == 0
    out = capsys.readouterr().out
    assert "| attack | none |" in out and "results.json" in out
    assert main(["bench", "--attacks", "nope", "--out", str(tmp_path / "x")]) == 2


def test_trigger_settings_reach_the_attack_and_its_key(tmp_path, tiny_model):
    base = tiny_config(tiny_model)
    moved = parse_bench_settings(base, ["badnet.location=random"])
    assert moved.trigger_settings == {"badnet": {"location": "random"}}
    attack = bench.attack_settings(base, "badnet", 0)
    assert bench.attack_key(base, attack) != bench.attack_key(moved, attack)
    model, directory, _, _ = bench.backdoored_model(moved, "badnet", 0, tmp_path / "out")
    assert json.loads((directory / "config.json").read_text())["attack"]["trigger"]["location"] == "random"


def test_two_process_bench_matches_one_process(tmp_path, tiny_model):
    """`clipguard bench` under torchrun (2 gloo processes): the same cells as one process."""
    from test_ddp import _run, _torchrun, one_thread

    flags = ["bench", "--model", tiny_model, "--attacks", "badnet", "--defenses", "none", "vpt", "--shots", "2",
             "--limit", "64", "--pr-images", "0", "--device", "cpu",
             *[x for item in TINY_ATTACK + ["vpt.epochs=2", "vpt.prompt_length=2", "vpt.batch_size=4"]
               for x in ("--set", item)]]
    with one_thread():
        assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    two = _run([*_torchrun(2), "-m", "clipguard.cli", *flags, "--out", str(tmp_path / "two")])
    assert two.stdout.count("results.json") == 1  # rank 0 alone reports
    single, split = (json.loads((tmp_path / n / "results.json").read_text())["cells"] for n in ("one", "two"))
    metrics = ("clean_accuracy", "attack_success_rate", "poisoned_accuracy")
    assert [[c[m] for m in metrics] for c in split] == [[c[m] for m in metrics] for c in single]
    assert [c["defense"] for c in split] == ["none", "vpt"]


def test_a_trigger_setting_added_later_at_its_default_keeps_old_model_keys():
    from clipguard.keys import record_key

    old = {"name": "badnet-lc", "target": "bag", "seed": 0, "trigger": {"seed": 0, "adversarial_epsilon": 0.1}}
    new = {**old, "trigger": {**old["trigger"], "decoy_rate": 0.0}}
    assert record_key("builtin", new) == record_key("builtin", old)
    assert record_key("builtin", {**old, "trigger": {**old["trigger"], "decoy_rate": 0.1}}) != record_key("builtin", old)


def _cell_peak(megabytes: int) -> float | None:
    """A bench-cell-like stretch that allocates (and frees) ``megabytes`` of float32: its peak."""
    import torch

    from clipguard.device import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    block = torch.ones(megabytes * 2**18)
    block.add_(1)
    del block
    return memory.peak_mb()


def test_each_cell_reports_its_own_peak_memory_whatever_ran_before():
    import torch

    from clipguard.device import PeakMemory

    if PeakMemory(torch.device("cpu")).kind == "not measured":
        pytest.skip("the peak resident memory cannot be reset here (not Linux)")
    big, small_after = _cell_peak(256), _cell_peak(8)
    small, big_after = _cell_peak(8), _cell_peak(256)
    assert small_after < big - 200 and big_after > small + 200  # not the process's peak so far
    assert abs(small_after - small) < 64 and abs(big_after - big) < 64  # the same cell, the same peak, either order


def test_peak_memory_that_cannot_be_reset_is_not_measured(monkeypatch, tmp_path):
    import torch

    from clipguard import device
    from clipguard.eval.tables import NOT_MEASURED, cost_table

    monkeypatch.setattr(device, "CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    memory = device.PeakMemory(torch.device("cpu"))
    assert (memory.kind, memory.peak_mb()) == ("not measured", None)
    record = {"attack": "badnet", "defense": "none", "defense_seconds": 0.0, "trainable_parameters": 0,
              "peak_memory_mb": memory.peak_mb(), "peak_memory_kind": memory.kind}
    _, rows, _ = cost_table([record])
    assert rows[0][-1] == NOT_MEASURED
