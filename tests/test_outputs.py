"""What clipguard promises about the user's files and interrupted runs.

1. It never deletes or overwrites what it did not write.
2. Two runs on one output: the second is refused and told who holds it.
3. Interrupted runs leave nothing stale, and say how to continue.

Each CLI case checks the exit code, the one-line message and that nothing outside ``--out`` changed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipguard.cli import main
from clipguard.models import save_clip
from clipguard.outputs import mark_bench_directory

from conftest import DEFEND, TINY28, make_tiny_clip, refused, snapshot


# ------------------------------------------------------------------ 1. never lose files
def test_defend_refuses_an_out_directory_holding_the_users_files(capsys, tmp_path, model_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.txt").write_text("x")
    before = snapshot(tmp_path)
    start = time.perf_counter()
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", str(tmp_path / "d")], "thesis.txt",
            "did not write")
    assert time.perf_counter() - start < 5  # refused before the fit, not after it
    assert snapshot(tmp_path) == before


def test_out_dot_the_working_directory_is_refused(capsys, tmp_path, model_dir, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", "."], "working directory")
    refused(capsys, ["attack", "--model", str(model_dir), "--out", ".."], "working directory")
    assert snapshot(tmp_path) == before


def test_out_an_existing_file_is_refused(capsys, tmp_path, model_dir):
    (tmp_path / "result").write_text("keep me")
    before = snapshot(tmp_path)
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", str(tmp_path / "result")], "existing file")
    refused(capsys, ["bench", "--out", str(tmp_path / "result")], "existing file")
    assert snapshot(tmp_path) == before


def test_bench_refuses_a_directory_of_other_files(capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.md").write_text("my own results")
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    before = snapshot(tmp_path)
    refused(capsys, ["bench", "--out", str(tmp_path / "mine")], "not a clipguard bench directory")
    assert snapshot(tmp_path) == before


def test_bench_never_overwrites_a_results_md_it_did_not_write(capsys, tmp_path):
    out = tmp_path / "bench"
    (out / "cells").mkdir(parents=True)
    (out / "results.md").write_text("what bench wrote")
    mark_bench_directory(out, out / "results.md")
    (out / "results.md").write_text("the user's edit")
    before = snapshot(tmp_path)
    refused(capsys, ["bench", "--out", str(out)], "results.md", "edited since")
    assert snapshot(tmp_path) == before


def test_a_clipguard_output_is_replaced_and_nothing_is_left_beside_it(capsys, tmp_path, model_dir):
    out = tmp_path / "d"
    assert main([*DEFEND, "--model", str(model_dir), "--out", str(out)]) == 0
    first = json.loads((out / "config.json").read_text())
    assert main([*DEFEND, "--model", str(model_dir), "--out", str(out), "--seed", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1 != first["config"]["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "model"]  # no lock, no staging


# ---------------------------------------------------------------- 2. one run per output
def test_a_second_run_on_a_locked_out_is_refused_naming_the_holder(capsys, tmp_path):
    out = tmp_path / "bench"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from clipguard.outputs import claim_outputs\n"
         "with claim_outputs(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(capsys, ["bench", "--out", str(out)], "is in use by another clipguard run",
                f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


# ----------------------------------------------------------- 3. leftovers of interrupted runs
def test_staging_left_by_a_killed_save_is_removed_on_the_next_run(capsys, tmp_path, model_dir):
    stale = tmp_path / ".d.clipguard-staging-x1y2z3"
    old_style = tmp_path / ".d.k3j4h5g6"  # an older version's staging: only clipguard's files
    users = tmp_path / ".d.mybackup"  # the same shape of name, but the user's folder
    for folder in (stale, old_style, users):
        folder.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    (old_style / "weights.safetensors").write_bytes(b"0" * 1000)
    (users / "notes.txt").write_text("mine")
    assert main([*DEFEND, "--model", str(model_dir), "--out", str(tmp_path / "d")]) == 0
    assert not stale.exists() and not old_style.exists()
    assert (users / "notes.txt").read_text() == "mine"


def test_ctrl_c_during_an_attack_says_that_resume_continues_it(tmp_path, model_dir):
    (tmp_path / "attack.yaml").write_text("pairs: 256\npoison_rate: 0.25\ntrain:\n  epochs: 200\n  batch_size: 16\n"
                                          "  warmup_steps: 0\n  checkpoint_every: 1\n")
    command = [sys.executable, "-m", "clipguard.cli", "attack", "--model", str(model_dir), "--config",
               str(tmp_path / "attack.yaml"), "--device", "cpu", "--out", str(tmp_path / "out")]
    # a shell without job control starts background jobs with SIGINT ignored, and the child would
    # inherit that: give it the default disposition, as an interactive terminal does
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = tmp_path / "out.run" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert f"{checkpoint} holds the last checkpoint" in err and "--resume" in err
    assert not (tmp_path / "out").exists()


def test_bench_resumes_an_interrupted_attack_from_its_checkpoint(tmp_path, caplog, monkeypatch):
    import logging

    from clipguard import bench, engine
    from clipguard.bench import BenchConfig, parse_bench_settings, run_bench

    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "clean")
    config = parse_bench_settings(
        BenchConfig(model=str(tmp_path / "clean"), attacks=["badnet"], defenses=["none"], limit=30, pr_images=0,
                    device="cpu"),
        ["attack.pairs=64", "attack.poison_rate=0.25", "attack.train.epochs=2", "attack.train.batch_size=16",
         "attack.train.warmup_steps=0"])
    run_bench(config, tmp_path / "whole")
    real_save = engine._save_checkpoint

    def stop_after_the_first_epoch(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the user stops the bench once a checkpoint is on disk

    monkeypatch.setattr(engine, "_save_checkpoint", stop_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, tmp_path / "cut")
    monkeypatch.setattr(engine, "_save_checkpoint", real_save)
    with caplog.at_level(logging.INFO, logger="clipguard.engine"):
        run_bench(config, tmp_path / "cut")
    assert "at step 4/8" in caplog.text  # continued, not restarted
    name = bench.model_directory(Path(), "badnet", 0.25, 0).name
    whole, cut = (load_file(str(tmp_path / run / "models" / name / "model.safetensors")) for run in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)  # bit-identical to the uninterrupted run
