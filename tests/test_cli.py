import argparse
import json

import torch

from clipguard.cli import main
from clipguard.models import save_clip

from conftest import make_tiny_clip


def test_evaluate_writes_the_json_record(tmp_path, capsys):
    save_clip(make_tiny_clip(), tmp_path / "model")
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(tmp_path / "model"), "--limit", "50", "--json", str(out), "--seed", "3",
                 "--device", "cpu"])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["clean_accuracy"]["total"] == 50
    assert 0 <= record["clean_accuracy"]["correct"] <= 50
    assert record["clean_accuracy"]["value"] == record["clean_accuracy"]["correct"] / 50
    assert (record["model"], record["dataset"], record["seed"]) == (str(tmp_path / "model"), "fmnist", 3)
    assert "CA" in capsys.readouterr().out


def test_the_summary_names_the_validation_slice_it_scored(tmp_path, capsys):
    save_clip(make_tiny_clip(), tmp_path / "model")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--dataset", "fmnist-val", "--limit", "20",
                 "--device", "cpu"]) == 0
    assert "on fmnist-val (Fashion-MNIST train[55000:]): CA" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--limit", "20", "--device", "cpu"]) == 0
    assert "on fmnist/test: CA" in capsys.readouterr().out


def test_bad_model_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path / "missing"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("clipguard: error: cannot load model") and err.count("\n") == 1


def test_config_file_with_an_unknown_field_is_refused(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("train:\n  epochz: 3\n")
    code = main(["train-builtin", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "epochz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_partial_nested_config_keeps_the_parents_defaults(tmp_path):
    from clipguard.attacks.poison import AttackConfig
    from clipguard.config import load_config

    (tmp_path / "attack.yaml").write_text("attack: badnet-lc\ntrain:\n  batch_size: 64\n")
    config = load_config(AttackConfig, tmp_path / "attack.yaml")
    defaults = AttackConfig().train
    assert config.attack == "badnet-lc" and config.train.batch_size == 64
    # the attack's own fine-tune recipe, not TrainConfig's class defaults (1 epoch, lr 5e-4)
    assert (config.train.epochs, config.train.lr, config.train.warmup_steps) == (
        defaults.epochs, defaults.lr, defaults.warmup_steps) == (5, 1e-4, 10)


def test_oracle_repair_cli_on_a_clean_pool_leaves_the_model_alone(tmp_path, capsys):
    from clipguard.models import load_clip

    from conftest import TINY28

    clip = make_tiny_clip(architecture=TINY28)
    save_clip(clip, tmp_path / "m")
    code = main(["defend", "--method", "oracle-repair", "--model", str(tmp_path / "m"), "--pool", "fmnist-test:40",
                 "--device", "cpu", "--out", str(tmp_path / "repaired")])
    assert code == 0
    assert "no localisable trigger" in capsys.readouterr().out
    report = json.loads((tmp_path / "repaired" / "repair.json").read_text())
    assert report["model_changed"] is False
    repaired = load_clip(str(tmp_path / "repaired"))
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), repaired.state_dict().values()))
    assert json.loads((tmp_path / "repaired" / "eval.json").read_text())["clean_accuracy"]["total"] == 10000


def test_oracle_repair_needs_a_pool(tmp_path, capsys):
    assert main(["defend", "--method", "oracle-repair", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "needs --pool" in capsys.readouterr().err


def test_detect_cli_writes_verdict_figure_and_json(tmp_path, capsys):
    from conftest import TINY28

    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "m")
    code = main(["detect", "--model", str(tmp_path / "m"), "--shots", "2", "--device", "cpu", "--set", "steps=2",
                 "--set", "restarts=1", "--detectors", "patch", "--set", "verdict.targeted.steps=2",
                 "--out", str(tmp_path / "det.png")])
    assert code == 0
    assert capsys.readouterr().out.startswith(("backdoored", "clean", "inconclusive"))
    result = json.loads((tmp_path / "det.json").read_text())
    assert set(result) >= {"backdoored", "target_name", "collapse"} and 0 <= result["collapse"] <= 1
    assert (tmp_path / "det.png").stat().st_size > 0


def test_list_settings_shows_every_field_with_its_default_and_comment(capsys):
    assert main(["list", "--settings", "rvpt"]) == 0
    out = capsys.readouterr().out
    assert "alpha = 2.0  # weight of the feature-repelling loss" in out and "lr = 0.002" in out
    assert main(["list", "--settings", "oracle-repair"]) == 0 and "clean_ratio = 3.0" in capsys.readouterr().out
    assert main(["list", "--settings", "nonsense"]) == 2


def test_list_settings_detect_names_every_detector_and_the_verdict_as_set_takes_them(capsys):
    from clipguard.cli.diagnose import detect_settings
    from clipguard.detection import DETECTORS

    assert main(["list", "--settings", "detect"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    for name in DETECTORS:
        assert any(line.startswith(f"{name}.steps = ") for line in lines), name
    assert any(line.startswith("verdict.backdoored_at = ") and "anomaly index" in line for line in lines)
    assert any(line.startswith("verdict.targeted.steps = ") for line in lines)
    # every listed name is one --set accepts, with its listed default
    items = [line.split("  # ")[0].replace(" = ", "=") for line in lines]
    settings, verdict = detect_settings([i for i in items if not i.startswith(("verdict.", "text.template", "full-image.families"))])
    assert set(settings) == set(DETECTORS) and not verdict
    assert main(["list", "--settings", "full-image"]) == 0 and "epsilon = 0.15" in capsys.readouterr().out


def test_every_registered_defense_is_listed_with_what_it_learns_from(capsys):
    from clipguard.defenses import DEFENSES

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, cls in DEFENSES.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert ("rewrites the weights" in line) == cls.rewrites_weights


def test_help_states_each_default_once_and_never_none():
    from clipguard.cli.main import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        text = " ".join(parser.format_help().split())  # argparse wraps lines
        assert "(default: None)" not in text and "(default: False)" not in text, name
    bench = " ".join(subparsers.choices["bench"].format_help().split())
    assert "few-shot defenses (default 16)" in bench and "(default 16) (default" not in bench
    assert "(0: in the main process) (default: 2)" in bench  # a real default is still shown


def test_every_command_the_parser_knows_has_a_function_that_runs_it():
    import importlib

    from clipguard.cli.parser import build_parser

    commands = importlib.import_module("clipguard.cli.main")
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(subparsers.choices) == 10 and all(callable(commands._command(name)) for name in subparsers.choices)
    assert build_parser().parse_args(["evaluate"]).command == "evaluate"
