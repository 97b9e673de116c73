"""The CBPT table: detection, CoOp and CBPT on every backdoored model under --models.

For each model directory (config.json with an "attack" record, e.g. runs/attacks/badnet-0.03):
ASR (CA) with no defense, with CoOp and with CBPT (16 clean train shots per class, seed
--seed), the time split of the CBPT run, and CBPT's stage-1 detection (found target vs the true
one). The clean built-in model gets detection for every --clean-seeds seed and its CA under
CoOp/CBPT. Results are cached as JSON per (model, method, settings) under --out (the bench's key),
so a rerun resumes and a changed --set recomputes.
ASR counts triggered test images of non-target classes only.

    OMP_NUM_THREADS=1 nice python benchmarks/cbpt_table.py --models runs/attacks --out runs/cbpt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from _tables import markdown_row, markdown_table
from clipguard import pipeline
from clipguard.attacks import load_trigger
from clipguard.defenses.cbpt import CBPTConfig
from clipguard.detection.inversion import detect_backdoor, save_detection_figure
from clipguard.eval.evaluate import write_json
from clipguard.keys import cell_key, record_key
from clipguard.models.loading import load_clip


def shots_for(seed: int, per_class: int):
    return pipeline.draw_shots(per_class, seed)


def cache_path(out: Path, model: str, method: str, settings, limit: int | None) -> Path:
    """out/<model>/<method>-<key>.json, keyed like the bench's cells (the model's attack settings,
    the method and all its settings, the limit): a changed --set never reuses a stale cell."""
    config = Path(model) / "config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    model_key = record_key(saved.get("source", ""), saved["attack"]) if "attack" in saved else model
    key = cell_key(model_key, method, settings or {}, limit)
    return out / Path(model).name / f"{method}-{key}.json"


def run_method(model: str, method: str, args, out: Path) -> dict:
    """Evaluate ``model`` under ``method`` ('none', 'coop', 'cbpt'); cached as JSON."""
    overrides = dict(args.set) if method == "cbpt" else {}
    settings = {} if method == "none" else pipeline.defense_config(method, args.seed, "cpu", args.shots, overrides)
    cache = cache_path(out, model, method, settings, args.limit)
    if cache.exists():
        return json.loads(cache.read_text())
    clip = pipeline.load_model(model, device="cpu")
    record = clip.config.get("attack")
    trigger = load_trigger(model, record) if record else None
    target = record["target"] if record else None
    start, cpu = time.perf_counter(), time.process_time()
    defended = pipeline.defend(clip, method, config=settings or None)
    stats = dict(defended.stats)
    if method != "none":
        # CPU seconds of this 1-thread process: the wall time also counts time spent paused or
        # waiting for a core while other jobs run
        stats["wall_seconds"] = round(time.perf_counter() - start, 2)
        stats["cpu_seconds"] = round(time.process_time() - cpu, 2)
    result = pipeline.evaluate(defended, trigger=trigger, target=target, limit=args.limit, seed=args.seed,
                               progress=False, name=model)
    result["stats"] = stats
    write_json(result, cache)
    return result


def fmt(result: dict) -> str:
    ca = 100 * result["clean_accuracy"]["value"]
    if "attack_success_rate" not in result:
        return f"- ({ca:.2f})"
    asr = result["attack_success_rate"]
    return f"{100 * asr['value']:.2f} ({ca:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="runs/attacks", help="directory of backdoored model directories")
    parser.add_argument("--out", default="runs/cbpt")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--only", nargs="*", default=None, help="model directory names to run")
    parser.add_argument("--set", nargs="*", default=[], help="CBPT config overrides FIELD=VALUE",
                        type=lambda s: (s.split("=")[0], yaml.safe_load(s.split("=")[1])))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    models = sorted(p for p in Path(args.models).glob("*") if (p / "config.json").is_file()
                    and "attack" in json.loads((p / "config.json").read_text()))
    if args.only:
        models = [p for p in models if p.name in args.only]
    rows, detection_rows = [], []
    for model in [Path("builtin"), *models]:
        name = "clean (builtin)" if str(model) == "builtin" else model.name
        results = {m: run_method(str(model), m, args, out) for m in ("none", "coop", "cbpt")}
        rows.append((name, results))
        print(markdown_row([name, fmt(results["none"]), fmt(results["coop"]), fmt(results["cbpt"])]), flush=True)
        stats = results["cbpt"]["stats"]
        true_target = results["none"].get("attack", {}).get("target", "-")
        label = f"{name}, in the CBPT run" if str(model) == "builtin" else name
        detection_rows.append((label, args.seed, true_target, stats["detection"], stats))
    clean = load_clip("builtin", device="cpu")
    for seed in args.clean_seeds:
        cache = out / "builtin" / f"detect-seed{seed}.json"
        if not cache.exists():
            shots = shots_for(seed, args.shots)
            config = CBPTConfig(shots=args.shots, seed=seed, device="cpu", **dict(args.set)).inversion_config()
            result = detect_backdoor(clean, shots, config)
            save_detection_figure(result, shots, out / "builtin" / f"detect-seed{seed}.png")
            write_json(result.as_dict(), cache)
        detection_rows.append(("clean (builtin)", seed, "-", json.loads(cache.read_text()), None))
    print("\nASR % (CA %), Fashion-MNIST test, 16 shots/class; ASR counts triggered non-target-class images only\n")
    print(markdown_table(["attack", "none", "CoOp", "CBPT"],
                         [[name, *(fmt(results[m]) for m in ("none", "coop", "cbpt"))] for name, results in rows]))
    print("\nDetection (CBPT stage 1)\n")
    print(markdown_table(["model", "seed", "true target", "found target", "collapse", "mask area", "verdict"],
                         [[name, seed, true_target, d["target_name"], f"{d['collapse']:.2f}",
                           f"{100 * d['mask_area']:.1f}%", "backdoored" if d["backdoored"] else "not backdoored"]
                          for name, seed, true_target, d, _ in detection_rows]))
    print("\nCBPT time split (wall s; CPU s of the 1-thread process)\n")
    print(markdown_table(["model", "inversion", "features", "prompt tuning", "total wall", "total CPU"],
                         [[name, s["inversion_seconds"], s["feature_seconds"], s["prompt_seconds"], s["seconds"],
                           s.get("cpu_seconds", "-")] for name, _, _, _, s in detection_rows if s]))


if __name__ == "__main__":
    main()
