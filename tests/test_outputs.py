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
        [sys.executable, "-c", "import sys, time; from clipguard.locks import claim_outputs\n"
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


# ============================================================================================
# issue 31: one rule for --out (never an input, never another kind of output, no links, a
# writable folder), --json only over clipguard's own records, and nothing left by a failed run
TINY_ATTACK = "pairs: 32\npoison_rate: 0.25\ntrain:\n  epochs: 1\n  batch_size: 16\n  warmup_steps: 0\n"


def refused_after_work(capsys, argv: list[str], *fragments: str) -> None:
    """:func:`refused` for a run that fails after its progress bars (they share stderr): exit 2 and
    one ``clipguard: error:`` message holding ``fragments``, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("clipguard: error: ") == 1 and "Traceback" not in err, err
    message = err.split("clipguard: error: ", 1)[1].split("\n", 1)[0]
    assert all(fragment in message for fragment in fragments), err


def test_out_is_never_the_model_directory_nor_above_or_inside_it(capsys, tmp_path, model_dir):
    from conftest import folder_of_test_images

    folder = folder_of_test_images(tmp_path / "images", 1)
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "d" / "m")
    before = snapshot(tmp_path)
    model = ["--model", str(model_dir)]
    refused(capsys, [*DEFEND, *model, "--out", str(model_dir)], f"--out {model_dir} is the --model")  # the repro
    refused(capsys, ["attack", *model, "--out", str(model_dir)], "is the --model")  # a model of the same kind
    refused(capsys, [*DEFEND, *model, "--out", str(model_dir / "inner")], "is inside the --model")
    refused(capsys, [*DEFEND, "--model", str(tmp_path / "d" / "m"), "--out", str(tmp_path / "d")], "holds the --model")
    refused(capsys, ["evaluate", *model, "--json", str(model_dir / "eval.json")], "--json", "inside the --model")
    refused(capsys, ["detect", *model, "--out", str(model_dir / "x.png")], "inside the --model")
    refused(capsys, [*DEFEND, *model, "--dataset", str(folder), "--out", str(folder / "d")], "inside the --dataset")
    (tmp_path / "link").symlink_to(model_dir)
    refused(capsys, [*DEFEND, *model, "--out", str(tmp_path / "link")], "is the --model")  # compared resolved
    (tmp_path / "link").unlink()
    assert snapshot(tmp_path) == before


def test_an_output_is_replaced_only_by_one_of_the_same_kind(capsys, tmp_path, model_dir, defense_dir):
    from clipguard import ClipguardError

    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "cc")  # an earlier weight-rewriting defense's model
    before = snapshot(tmp_path)
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", str(tmp_path / "cc")],
            "is a model directory, and this run writes a defense directory", "same kind")
    refused(capsys, ["attack", "--model", str(model_dir), "--out", str(defense_dir)],
            "is a defense directory, and this run writes a model directory")
    with pytest.raises(ClipguardError, match="same kind"):  # the library's save checks it too
        save_clip(make_tiny_clip(architecture=TINY28), defense_dir)
    assert snapshot(tmp_path) == before


def test_json_goes_only_to_a_new_file_or_a_record_clipguard_wrote(capsys, tmp_path, model_dir):
    (tmp_path / "notes.json").write_text('{"mine": [1, 2]}')
    (tmp_path / "fig.json").write_text('{"mine": 3}')
    before = snapshot(tmp_path)
    refused(capsys, ["evaluate", "--model", str(model_dir), "--json", str(tmp_path / "notes.json")],
            "notes.json exists and clipguard did not write it", "move it away or choose another name")
    refused(capsys, ["detect", "--model", str(model_dir), "--out", str(tmp_path / "fig.png")],
            "fig.json (written beside it) exists and clipguard did not write it")
    assert snapshot(tmp_path) == before
    old = {"model": "m", "clean_accuracy": {"value": 0.5, "correct": 1, "total": 2}}  # before records were marked
    (tmp_path / "old.json").write_text(json.dumps(old))
    for _ in range(2):  # over an unmarked older record, then over its own marked one
        assert main(["evaluate", "--model", str(model_dir), "--limit", "10", "--device", "cpu",
                     "--json", str(tmp_path / "old.json")]) == 0
    record = json.loads((tmp_path / "old.json").read_text())
    assert record["format"] == "clipguard.evaluation" and record["clean_accuracy"]["total"] == 10


def _read_only(monkeypatch, *folders: Path) -> None:
    """Make ``folders`` read-only; as root (who may write anyway) also answer os.access as a user sees it."""
    for folder in folders:
        folder.chmod(0o555)
    if os.geteuid() == 0:
        real, locked = os.access, {folder.resolve() for folder in folders}
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (Path(path).resolve() in locked and mode & os.W_OK)
                            and real(path, mode, **kw))


def test_a_read_only_folder_is_refused_before_any_work(capsys, tmp_path, model_dir, defense_dir, monkeypatch):
    (tmp_path / "ro").mkdir()
    try:
        _read_only(monkeypatch, tmp_path / "ro", defense_dir)
        before = snapshot(tmp_path)
        refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", str(tmp_path / "ro" / "new" / "d")],
                f"{tmp_path / 'ro'} is read-only")
        refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", str(defense_dir)], f"{defense_dir} is read-only")
        refused(capsys, ["evaluate", "--model", str(model_dir), "--json", str(tmp_path / "ro" / "e.json")], "read-only")
        assert snapshot(tmp_path) == before
    finally:
        for folder in (tmp_path / "ro", defense_dir):
            folder.chmod(0o755)


def test_out_a_symbolic_link_is_refused_before_any_work(capsys, tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "e.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "e.json")
    before = snapshot(tmp_path)
    start = time.perf_counter()
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--out", str(tmp_path / "link")], "is a symbolic link",
            "name the directory itself")
    refused(capsys, ["evaluate", "--model", str(model_dir), "--json", str(tmp_path / "link.json")], "symbolic link")
    assert time.perf_counter() - start < 5  # before the fit, not after it
    assert snapshot(tmp_path) == before


def test_a_diverged_attack_leaves_no_folder_behind(capsys, tmp_path, model_dir):
    (tmp_path / "attack.yaml").write_text(TINY_ATTACK)
    before = snapshot(tmp_path)
    refused_after_work(capsys, ["attack", "--model", str(model_dir), "--config", str(tmp_path / "attack.yaml"),
                                "--lr", "1e12", "--device", "cpu", "--out", str(tmp_path / "new" / "bd")],
                       "diverged", "nothing was saved")
    assert snapshot(tmp_path) == before  # no new/, bd.run/ or lock


def test_a_stale_lock_of_a_killed_run_is_reused_and_removed(tmp_path):
    from clipguard.locks import claim_outputs, lock_path

    out = tmp_path / "bench"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from clipguard.locks import claim_outputs\n"
         "with claim_outputs(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no release
    holder.wait()
    assert lock_path(out).is_file()
    with claim_outputs(out):  # not refused: the lock died with its process
        assert str(os.getpid()) in lock_path(out).read_text()
    assert not lock_path(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["safetensors", "checkpoint"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_file(capsys, tmp_path, model_dir, monkeypatch,
                                                                           writer):
    from safetensors import SafetensorError

    from clipguard.defenses import base
    from conftest import folder_of_test_images

    def full(path, size):
        Path(path).write_bytes(b"0" * size)  # what got written before the disk filled up

    if writer == "safetensors":  # the message safetensors 0.8 gives on a full tmpfs
        def save_file(tensors, path, metadata=None):
            full(path, 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(base, "save_file", save_file)
        argv = [*DEFEND, "--model", str(model_dir), "--dataset", str(folder_of_test_images(tmp_path / "images", 2)),
                "--out", str(tmp_path / "d")]
    else:  # torch.save's zip writer on a full disk
        def save(state, path, *args, **kwargs):
            full(path, 5000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        monkeypatch.setattr(torch, "save", save)
        (tmp_path / "attack.yaml").write_text(TINY_ATTACK)
        argv = ["attack", "--model", str(model_dir), "--config", str(tmp_path / "attack.yaml"), "--device", "cpu",
                "--out", str(tmp_path / "bd")]
    before = snapshot(tmp_path)
    refused_after_work(capsys, argv, "writing a file failed", "full disk")
    assert snapshot(tmp_path) == before  # no output, staging, checkpoint folder, .tmp or lock
