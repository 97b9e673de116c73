"""Defense table: each backdoored model under --models x each defense, ASR (CA) per cell.

    python benchmarks/defense_table.py --models runs/attacks --defenses vpt rvpt --shots 16

A cell runs through :mod:`clipguard.pipeline` and is written to --out/<model>/<defense>-<key>.json,
where <key> is the bench's cell key (the model's attack settings, the defense and all its settings,
the limit): an interrupted table resumes, and a changed --set never reuses a stale cell.
--set FIELD=VALUE changes the defense config (every defense in the run); --tag labels the variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _tables import markdown_table
from clipguard import pipeline
from clipguard.attacks import load_trigger
from clipguard.config import parse_assignments
from clipguard.defenses import get_defense_class
from clipguard.eval.evaluate import write_json
from clipguard.keys import cell_key, record_key


def settings_of(defense_name: str, shots: int, seed: int, assignments: list[str]):
    """The defense's config for a cell (the same one ``clipguard bench`` would build)."""
    if defense_name == "none":
        return {}
    cls = get_defense_class(defense_name)
    return pipeline.defense_config(defense_name, seed, "cpu", shots, parse_assignments(cls.config_class, assignments))


def cache_key(model_dir: Path, defense_name: str, settings, limit: int | None) -> str:
    """The bench's cell key: the model's attack settings, the method, its settings and the limit."""
    saved = json.loads((model_dir / "config.json").read_text())
    return cell_key(record_key(saved.get("source", ""), saved["attack"]), defense_name, settings, limit)


def run_cell(model_dir: Path, defense_name: str, settings, seed: int, limit: int | None = None) -> dict:
    clip = pipeline.load_model(str(model_dir), device="cpu")
    record = clip.config["attack"]
    defended = pipeline.defend(clip, defense_name, config=settings or None, suspect_dir=model_dir)
    start = time.perf_counter()
    result = pipeline.evaluate(defended, trigger=load_trigger(model_dir, record), target=record["target"],
                               limit=limit, seed=seed, progress=False, name=str(model_dir))
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["defense_stats"] = {k: v for k, v in defended.stats.items() if isinstance(v, (int, float, str, bool))}
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
            settings = settings_of(name, args.shots, args.seed, args.set if name != "none" else [])
            key = cache_key(model_dir, name, settings, args.limit)
            path = Path(args.out) / model_dir.name / f"{name}-{key}.json"  # any other setting: another file
            if not path.exists():
                write_json(run_cell(model_dir, name, settings, args.seed, args.limit), path)
            result = json.loads(path.read_text())
            table[(model_dir.name, label)] = result
            asr, ca = result["attack_success_rate"], result["clean_accuracy"]
            secs = result["defense_stats"].get("seconds", 0)
            print(f"{model_dir.name:16s} {label:14s} ASR {100 * asr['value']:6.2f} ({asr['hits']}/{asr['total']})  "
                  f"CA {100 * ca['value']:5.2f}  fit {secs:.0f} s", flush=True)
    labels = list(dict.fromkeys(label for _, label in table))
    rows = []
    for model in dict.fromkeys(m for m, _ in table):
        cells = []
        for label in labels:
            r = table.get((model, label))
            cells.append(f"{100 * r['attack_success_rate']['value']:.2f} ({100 * r['clean_accuracy']['value']:.2f})" if r else "")
        rows.append([model, *cells])
    print("\n" + markdown_table(["model", *labels], rows))
    print("\nCells: ASR (CA), %. ASR counts triggered test images of non-target classes only.")


if __name__ == "__main__":
    main()
