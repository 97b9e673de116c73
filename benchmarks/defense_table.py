"""Defense table: each backdoored model under --models x each defense, ASR (CA) per cell.

    python benchmarks/defense_table.py --models runs/attacks --defenses vpt rvpt --shots 16

A cell's result is written to --out/<model>/<defense>[-<tag>].json and reused when present,
so an interrupted table resumes. --set FIELD=VALUE changes the defense config (every defense
in the run); --tag names such a variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipguard.attacks import load_trigger
from clipguard.config import override, parse_assignments
from clipguard.data import few_shot_indices, load_fmnist
from clipguard.defenses import get_defense_class
from clipguard.eval.evaluate import evaluate_model, write_json
from clipguard.models import load_clip


def run_cell(model_dir: Path, defense_name: str, shots: int, seed: int, assignments: list[str],
             limit: int | None = None) -> dict:
    clip = load_clip(str(model_dir), device="cpu")
    record = clip.config["attack"]
    trigger = load_trigger(model_dir, record)
    defense, stats = None, {}
    if defense_name != "none":
        cls = get_defense_class(defense_name)
        config = override(cls.config_class(shots=shots, seed=seed, device="cpu"), **parse_assignments(cls.config_class, assignments))
        train = load_fmnist("train")
        defense = cls(config, clip, train.classes)
        stats = defense.fit(clip, train.subset(few_shot_indices(train.labels, shots, seed, len(train.classes))))
    start = time.perf_counter()
    result = evaluate_model(clip, str(model_dir), limit=limit, seed=seed, trigger=trigger,
                            target=record["target"], defense=defense, progress=False)
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["defense_stats"] = stats
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="runs/attacks", help="directory of backdoored model directories")
    parser.add_argument("--only", nargs="*", help="model directory names to use (default: all)")
    parser.add_argument("--defenses", nargs="*", default=["none", "vpt", "rvpt"])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--tag", default="", help="names a --set variant in the output")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images only (exploration)")
    parser.add_argument("--out", default="runs/defenses")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = sorted(p for p in Path(args.models).iterdir() if (p / "eval.json").exists())
    if args.only:
        models = [p for p in models if p.name in args.only]
    table = {}
    for model_dir in models:
        for name in args.defenses:
            label = name + (f"-{args.tag}" if args.tag and name != "none" else "")
            subset = f"-n{args.limit}" if args.limit else ""
            path = Path(args.out) / model_dir.name / f"{label}-s{args.shots}-seed{args.seed}{subset}.json"
            if not path.exists():
                result = run_cell(model_dir, name, args.shots, args.seed, args.set if name != "none" else [], args.limit)
                write_json(result, path)
            result = json.loads(path.read_text())
            table[(model_dir.name, label)] = result
            asr, ca = result["attack_success_rate"], result["clean_accuracy"]
            secs = result["defense_stats"].get("seconds", 0)
            print(f"{model_dir.name:16s} {label:14s} ASR {100 * asr['value']:6.2f} ({asr['hits']}/{asr['total']})  "
                  f"CA {100 * ca['value']:5.2f}  fit {secs:.0f} s", flush=True)
    labels = list(dict.fromkeys(label for _, label in table))
    print("\n| model | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for model in dict.fromkeys(m for m, _ in table):
        cells = []
        for label in labels:
            r = table.get((model, label))
            cells.append(f"{100 * r['attack_success_rate']['value']:.2f} ({100 * r['clean_accuracy']['value']:.2f})" if r else "")
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("\nCells: ASR (CA), %. ASR counts triggered test images of non-target classes only.")


if __name__ == "__main__":
    main()
