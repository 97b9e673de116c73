"""What clipguard promises about its results and its inputs.

1. An ASR is always measured against the attack's own target class, found by name.
2. A broken run (a diverged fit, NaN weights, a model at chance) never passes as a result.
3. ``--resume`` continues only a run of the same settings.
4. Bad input is one ``clipguard: error:`` line, before any work.
5. A file that changed since clipguard wrote it is refused (``--no-verify`` for deliberate edits).

Each CLI case checks the exit code, the one-line message and that nothing outside ``--out`` changed.
The promises about the user's files are in test_outputs.py.
"""

import errno
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, build_trigger, save_backdoored
from clipguard.attacks.poison import attack_record
from clipguard.cli import main
from clipguard.data import FMNIST_CLASSES, load_fmnist
from clipguard.engine import TrainConfig, fit
from clipguard.models import load_clip, save_clip

from conftest import DEFEND, TINY28, folder_of_test_images, make_tiny_clip, refused, snapshot


# ------------------------------------------------------- 1. ASR against the right class
def _backdoored_builtin(tmp_path: Path) -> Path:
    """The built-in model saved with a BadNet attack record towards bag (a real 28 px CLIP)."""
    trigger = build_trigger("badnet", 28, seed=0)
    save_backdoored(load_clip("builtin"), trigger, attack_record(trigger, AttackConfig(), FMNIST_CLASSES),
                    tmp_path / "suspect")
    return tmp_path / "suspect"


def test_asr_is_measured_against_the_target_by_name_on_an_image_folder(tmp_path, capsys):
    suspect = _backdoored_builtin(tmp_path)
    folder = folder_of_test_images(tmp_path / "folder", per_class=6)
    # the folder sorts its classes by name: bag is 2nd there, 9th in Fashion-MNIST
    assert main(["evaluate", "--model", str(suspect), "--dataset", str(folder), "--device", "cpu",
                 "--json", str(tmp_path / "folder.json")]) == 0
    record = json.loads((tmp_path / "folder.json").read_text())
    assert record["classes"][1] == "bag" and record["attack"]["target"] == "bag"
    assert "badnet -> bag" in capsys.readouterr().out
    # the same 60 images in Fashion-MNIST's order give the same counts
    from clipguard.attacks import load_trigger
    from clipguard.eval.evaluate import evaluate_trigger
    from clipguard.defenses import DefendedClip

    test = load_fmnist("test")
    chosen = torch.cat([torch.nonzero(test.labels == c).flatten()[:6] for c in range(10)])
    clip = load_clip(str(suspect))
    same = evaluate_trigger(DefendedClip(clip), test.subset(chosen), load_trigger(suspect, clip.config["attack"]), "bag")
    assert record["attack_success_rate"] == same["attack_success_rate"]
    assert record["poisoned_accuracy"] == same["poisoned_accuracy"]
    assert record["attack_success_rate"]["total"] == 54  # the six bags are excluded, not six t-shirts


def test_a_dataset_without_the_target_class_is_refused(tmp_path, capsys):
    suspect = _backdoored_builtin(tmp_path)
    folder = folder_of_test_images(tmp_path / "folder", per_class=2, classes=FMNIST_CLASSES[:5])
    before = snapshot(tmp_path)
    refused(capsys, ["evaluate", "--model", str(suspect), "--dataset", str(folder), "--device", "cpu"],
            "target 'bag' is not a class")
    refused(capsys, ["evaluate", "--dataset", str(folder), "--attack", "badnet", "--target", "bag",
                     "--device", "cpu"], "target 'bag' is not a class")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------- 2. a broken run is not a result
def test_rvpt_learning_rate_out_of_range_is_refused(capsys, tmp_path, model_dir):
    before = snapshot(tmp_path)
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--set", "lr=1e12", "--out", str(tmp_path / "d")],
            "RVPTConfig.lr must be in")
    assert snapshot(tmp_path) == before


class _Diverging(torch.nn.Module):
    """A task whose loss is finite for ``finite_steps`` steps, then NaN."""

    def __init__(self, finite_steps: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.finite_steps, self.calls = finite_steps, 0

    def forward(self, batch):
        self.calls += 1
        loss = (self.weight * batch[0]).sum()
        return loss if self.calls <= self.finite_steps else loss * float("nan")


def test_a_fit_whose_loss_turns_nan_stops_with_the_step_and_a_hint(tmp_path):
    data = torch.utils.data.TensorDataset(torch.ones(8, 3))
    config = TrainConfig(epochs=4, batch_size=4, lr=0.1, device="cpu")
    with pytest.raises(ClipguardError, match=r"loss became nan at step 3 of 8.*lower the learning rate"):
        fit(_Diverging(finite_steps=2), data, config, run_dir=tmp_path / "run", desc="toy")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and torch.isfinite(saved["trainable"]["weight"]).all()  # the last good state only


def test_a_fit_whose_weights_overflow_stops_and_saves_nothing(tmp_path):
    data = torch.utils.data.TensorDataset(torch.full((4, 3), 1e30))  # one step: its loss is finite
    config = TrainConfig(epochs=1, batch_size=4, lr=1e10, optimizer="sgd", grad_clip=0.0, weight_decay=0.0,
                         device="cpu")
    with pytest.raises(ClipguardError, match="weight became NaN or inf by step 1 of 1"):
        fit(_Diverging(finite_steps=100), data, config, run_dir=tmp_path / "run", desc="toy")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _rewrite_with_digest(directory: Path, name: str, tensors: dict) -> None:
    """Replace a weights file *and* its recorded digest, as a tool re-saving it would."""
    save_file(tensors, str(directory / name))
    config = json.loads((directory / "config.json").read_text())
    config["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "config.json").write_text(json.dumps(config))


def test_nan_weights_in_a_model_or_a_defense_are_refused_on_load(capsys, tmp_path, model_dir, defense_dir):
    weights = load_file(str(defense_dir / "weights.safetensors"))
    name = next(iter(weights))
    weights[name][..., 0] = float("nan")
    _rewrite_with_digest(defense_dir, "weights.safetensors", weights)
    refused(capsys, ["evaluate", "--model", str(model_dir), "--defense", str(defense_dir), "--device", "cpu"],
            "non-finite weights")
    state = load_file(str(model_dir / "model.safetensors"))
    state["visual.proj"][0, 0] = float("inf")
    _rewrite_with_digest(model_dir, "model.safetensors", state)
    refused(capsys, ["evaluate", "--model", str(model_dir), "--device", "cpu"], "non-finite weights", "visual.proj")


def test_a_model_at_chance_gets_a_warning_beside_its_asr(capsys, tmp_path):
    clip = make_tiny_clip(architecture=TINY28)
    with torch.no_grad():
        clip.model.visual.proj.zero_()  # every image the same (zero) feature: always the first class
    save_clip(clip, tmp_path / "broken")
    assert main(["evaluate", "--model", str(tmp_path / "broken"), "--attack", "badnet", "--target", "bag",
                 "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["clean_accuracy"]["value"] == 0.1 and record["attack_success_rate"]["value"] == 0.0
    assert "WARNING: CA 10.0% is at chance (10.0% for 10 classes): the model is broken and its ASR means nothing" in out
    assert "at chance" in record["warning"]


# ------------------------------------------------------------- 3. resume, same settings only
TINY_ATTACK_YAML = "pairs: 64\npoison_rate: 0.25\ntrain:\n  epochs: 2\n  batch_size: 16\n  warmup_steps: 0\n"


def test_resume_with_other_settings_is_refused_naming_them(capsys, tmp_path, model_dir):
    from clipguard.attacks.poison import run_attack
    from clipguard.config import load_config

    (tmp_path / "attack.yaml").write_text(TINY_ATTACK_YAML)
    config = load_config(AttackConfig, tmp_path / "attack.yaml")
    config = AttackConfig(**{**config.__dict__, "train": TrainConfig(**{**config.train.__dict__, "device": "cpu"})})
    run_attack(load_clip(str(model_dir)), config, run_dir=tmp_path / "out.run")  # leaves its checkpoint
    checkpoint = (tmp_path / "out.run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()  # the fine-tune's progress bar
    before = snapshot(tmp_path)
    refused(capsys, ["attack", "--model", str(model_dir), "--config", str(tmp_path / "attack.yaml"), "--attack",
                     "blended", "--lr", "2e-4", "--device", "cpu", "--resume", "--out", str(tmp_path / "out")],
            "other settings", "'badnet' -> 'blended'", "train.lr: 0.0001 -> 0.0002")
    assert snapshot(tmp_path) == before and (tmp_path / "out.run" / "checkpoint.pt").read_bytes() == checkpoint


# ------------------------------------------------------------------ 4. one line, no traceback
def _tamper(defense_dir: Path, change) -> None:
    path = defense_dir / "config.json"
    config = json.loads(path.read_text())
    path.write_text(change(config) if callable(change) else change)


TAMPERED = {
    "invalid JSON": ("{not json", "not valid JSON"),
    "a list": ("[1, 2]", "not a clipguard defense config"),
    "no backbone": (lambda c: json.dumps({k: v for k, v in c.items() if k != "backbone"}), "'backbone' is missing"),
    "no method": (lambda c: json.dumps({k: v for k, v in c.items() if k != "method"}), "'method' is missing"),
    "no config": (lambda c: json.dumps({k: v for k, v in c.items() if k != "config"}), "'config' is missing"),
    "wrong-typed key": (lambda c: json.dumps({**c, "config": {**c["config"], "prompt_length": "two"}}),
                        "RVPTConfig.prompt_length must be int"),
    "unknown method": (lambda c: json.dumps({**c, "method": "nonsense"}), "unknown defense 'nonsense'"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_defense_config_is_one_line(capsys, model_dir, defense_dir, case):
    change, message = TAMPERED[case]
    _tamper(defense_dir, change)
    refused(capsys, ["evaluate", "--model", str(model_dir), "--defense", str(defense_dir), "--device", "cpu"], message)


def test_defense_weights_of_the_wrong_shape_are_one_line(capsys, model_dir, defense_dir):
    weights = load_file(str(defense_dir / "weights.safetensors"))
    save_file({k: torch.zeros(3, *v.shape) for k, v in weights.items()}, str(defense_dir / "weights.safetensors"))
    refused(capsys, ["evaluate", "--model", str(model_dir), "--defense", str(defense_dir), "--device", "cpu",
                     "--no-verify"], "does not fit a rvpt defense")


def test_empty_checkpoint_files_are_one_line(capsys, tmp_path):
    for name in ("empty.safetensors", "empty.pt"):
        (tmp_path / name).write_bytes(b"")
        refused(capsys, ["evaluate", "--model", str(tmp_path / name), "--device", "cpu"], "is empty (0 bytes)")


BAD_ARGUMENTS = {
    "batch size 0": (["evaluate", "--batch-size", "0"], "--batch-size: must be >= 1"),
    "limit 0": (["evaluate", "--limit", "0"], "--limit: must be >= 1"),
    "limit -5": (["evaluate", "--limit", "-5"], "--limit: must be >= 1"),
    "device tpu": (["evaluate", "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    "start_block abc": ([*DEFEND, "--set", "start_block=abc", "--out", "{tmp}/d"], "'abc' is not a valid int | None"),
    "batch_size 0": ([*DEFEND, "--set", "batch_size=0", "--out", "{tmp}/d"], "RVPTConfig.batch_size must be in"),
    "pairs 100": (["attack", "--pairs", "100", "--out", "{tmp}/m"], "fewer than one fine-tuning batch"),
    "pool trigger rate 1.5": (["defend", "--method", "oracle-repair", "--pool", "fmnist-test:10",
                               "--pool-trigger-rate", "1.5", "--out", "{tmp}/d"], "must be in [0, 1], got 1.5"),
    "bench pool trigger rate 1.5": (["bench", "--pool-trigger-rate", "1.5", "--out", "{tmp}/b"], "got 1.5"),
    "evaluate --json a directory": (["evaluate", "--json", "{tmp}"], "is a directory"),
    "detect --out without .png": (["detect", "--out", "{tmp}/name"], "must end in .png"),
    "analyze --tsne without .png": (["analyze", "pr", "--tsne", "{tmp}/t.jpg"], "must end in .png"),
    "unknown flag": (["evaluate", "--frobnicate"], "unrecognized arguments: --frobnicate"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_a_bad_argument_is_one_line_before_any_work(capsys, tmp_path, case):
    argv, message = BAD_ARGUMENTS[case]
    before = snapshot(tmp_path)
    start = time.perf_counter()
    refused(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], message)
    assert time.perf_counter() - start < 10  # no model fitted, no dataset encoded
    assert snapshot(tmp_path) == before


DISK_FULL = {  # what a write to a full disk raises: torch.save's zip writer, and any Python file write
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "a file": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
}


@pytest.mark.parametrize("writer", sorted(DISK_FULL))
def test_a_full_disk_is_one_line_that_names_it(capsys, monkeypatch, writer):
    import importlib

    def command(args):
        raise DISK_FULL[writer]

    monkeypatch.setattr(importlib.import_module("clipguard.cli.main"), "cmd_evaluate", command)
    refused(capsys, ["evaluate"], "writing a file failed", "full disk", "free space")


# ------------------------------------------------------------------ 5. silent corruption
def _flip_tensor_bytes(path: Path) -> None:
    """Overwrite bytes inside the tensor data (the safetensors header stays valid)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 100 : header + 164] = os.urandom(64)
    path.write_bytes(bytes(data))


def test_a_weights_file_changed_since_it_was_written_is_refused(capsys, tmp_path, model_dir, defense_dir):
    _flip_tensor_bytes(defense_dir / "weights.safetensors")
    refused(capsys, ["evaluate", "--model", str(model_dir), "--defense", str(defense_dir), "--device", "cpu"],
            "weights.safetensors changed since clipguard wrote it", "--no-verify")
    _flip_tensor_bytes(model_dir / "model.safetensors")
    refused(capsys, ["evaluate", "--model", str(model_dir), "--device", "cpu"],
            "model.safetensors changed since clipguard wrote it")


def test_no_verify_loads_a_deliberately_edited_model(capsys, tmp_path, model_dir):
    state = load_file(str(model_dir / "model.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 0.5  # an edit on purpose
    save_file(state, str(model_dir / "model.safetensors"))
    refused(capsys, ["evaluate", "--model", str(model_dir), "--device", "cpu", "--limit", "10"], "changed since")
    assert main(["evaluate", "--model", str(model_dir), "--device", "cpu", "--limit", "10", "--no-verify"]) == 0
    assert "CA" in capsys.readouterr().out
