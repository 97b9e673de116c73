"""Score ``clipguard detect`` as a detector over a zoo of clean and backdoored models.

Each model is detected with each of ``--shot-seeds`` (a clean one with ``--clean-seeds``) (the shots and the inversion's restarts
are seeded by it, as ``clipguard detect --seed S`` does). A model directory whose config
records an attack is a positive, with that attack's target by name; ``builtin`` and any model
without an attack record are negatives. Reported, at the detector's threshold:

  * TPR: share of the positive runs called backdoored; FPR: share of the negative runs;
  * AUROC of the collapse score (scikit-learn), threshold-free;
  * target right: share of the positive runs whose suspected target is the attack's target
    (all of them, and those called backdoored).

Every run is appended to ``--out``/runs.jsonl as it finishes, and a rerun skips the runs
already there, so an interrupted zoo resumes. The tables go to ``--out``/detection.md.

    python benchmarks/detection_zoo.py --out runs/zoo --shot-seeds 0 --clean-seeds 0 1 2 3 4 \\
        --models builtin runs/bench/models/*-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sklearn.metrics import roc_auc_score

from _tables import markdown_table
from clipguard.detection.inversion import InversionConfig


def attack_of(model: str) -> dict | None:
    """The attack record of a clipguard model directory (None: a clean model)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("attack")


def model_name(model: str) -> str:
    """A model's name in the tables: its directory, or for train-builtin's OUT/model, OUT."""
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def detect(model: str, shots: int, seed: int) -> dict:
    from clipguard.detection.inversion import detect_backdoor
    from clipguard.models.loading import load_clip
    from clipguard.pipeline import draw_shots

    clip = load_clip(model, device="cpu")
    result = detect_backdoor(clip, draw_shots(shots, seed, "fmnist", clip.image_size),
                             InversionConfig(seed=seed, device="cpu"))
    return result.as_dict()


def summary(runs: list[dict]) -> dict:
    positive = [r for r in runs if r["attack"]]
    negative = [r for r in runs if not r["attack"]]
    row = {"positive runs": len(positive), "negative runs": len(negative)}
    if positive:
        row["TPR"] = sum(r["backdoored"] for r in positive) / len(positive)
        row["target right"] = sum(r["target_name"] == r["attack_target"] for r in positive) / len(positive)
        called = [r for r in positive if r["backdoored"]]
        row["target right when called"] = (sum(r["target_name"] == r["attack_target"] for r in called) / len(called)
                                           if called else None)
    if negative:
        row["FPR"] = sum(r["backdoored"] for r in negative) / len(negative)
    if positive and negative:
        row["AUROC"] = roc_auc_score([1] * len(positive) + [0] * len(negative),
                                     [r["collapse"] for r in positive + negative])
    return row


def table(runs: list[dict], threshold: float) -> str:
    runs_table = markdown_table(
        ["model", "attack (target)", "shot seed", "suspected target", "collapse", "verdict"],
        [[r["name"], f"{r['attack']} ({r['attack_target']})" if r["attack"] else "clean", r["seed"], r["target_name"],
          f"{r['collapse']:.3f}", "backdoored" if r["backdoored"] else "not backdoored"] for r in runs])
    groups = {"all": runs}
    for attack in sorted({r["attack"] for r in runs if r["attack"]}):
        groups[attack] = [r for r in runs if r["attack"] in (attack, None)]

    def cell(value):
        return "" if value is None else f"{value:.2f}"
    rows = []
    for name, group in groups.items():
        s = summary(group)
        rows.append([name, s["positive runs"], cell(s.get("TPR")), cell(s.get("target right")),
                     cell(s.get("target right when called")), s["negative runs"], cell(s.get("FPR")),
                     cell(s.get("AUROC"))])
    group_table = markdown_table(["group", "positive runs", "TPR", "target right", "target right when called",
                                  "negative runs", "FPR", "AUROC"], rows)
    return "\n".join([runs_table, "", f"At the threshold {threshold} (the group's positives, against every clean run):",
                      "", group_table]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="builtin or model directories")
    parser.add_argument("--shot-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clean-seeds", nargs="+", type=int, help="shot seeds of the clean models (default: --shot-seeds)")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--out", required=True, help="folder for runs.jsonl and detection.md")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    seen = {(r["model"], r["seed"], r["shots"]) for r in done}
    clean_seeds = args.clean_seeds or args.shot_seeds
    attacks = {model: attack_of(model) for model in args.models}
    seeds = {model: args.shot_seeds if attack else clean_seeds for model, attack in attacks.items()}
    for model, attack in attacks.items():
        for seed in seeds[model]:
            if (model, seed, args.shots) in seen:
                continue
            result = detect(model, args.shots, seed)
            run = {"model": model, "name": model_name(model), "seed": seed, "shots": args.shots,
                   "attack": attack["name"] if attack else None, "attack_target": attack["target"] if attack else None,
                   **result}
            with log.open("a") as f:
                f.write(json.dumps(run) + "\n")
            done.append(run)
            print(f"{run['name']} seed {seed}: collapse {run['collapse']:.2f}, target {run['target_name']}", flush=True)
    wanted = {(m, s) for m in args.models for s in seeds[m]}
    runs = [r for r in done if (r["model"], r["seed"]) in wanted and r["shots"] == args.shots]
    threshold = runs[0]["threshold"] if runs else InversionConfig().threshold
    (out / "detection.md").write_text(table(runs, threshold))
    print(json.dumps(summary(runs), indent=1))


if __name__ == "__main__":
    main()
