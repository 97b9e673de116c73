"""What a defense costs: wall time and peak memory of CleanCLIP vs RVPT vs CBPT on one
backdoored model, and zero-shot evaluation throughput vs a bare ``encode_image`` loop.

Each defense runs in its own child process, so its peak resident memory (``wait4``'s
``ru_maxrss``) is its own; the parent then evaluates what each child saved (CA, ASR).
CleanCLIP runs twice: with its own recipe (its default clean pairs) and at equal data (as
many clean pairs as the few-shot defenses get images: shots x classes).

    python benchmarks/cost.py --model runs/bench/models/badnet-p0.03-s0 --out runs/cost
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

COMPARED = ("cleanclip", "cleanclip-equal-data", "rvpt", "cbpt")


def child(args) -> None:
    """Run one defense (no evaluation) and save its output under ``args.out``."""
    from clipguard import pipeline
    from clipguard.bench import BenchConfig, defense_settings
    from clipguard.config import override
    from clipguard.data import load_fmnist
    from clipguard.models.loading import load_clip

    config = BenchConfig(model=args.model, shots=args.shots, device=args.device)
    method = args.child.removesuffix("-equal-data")
    settings = defense_settings(config, method, args.seed)
    if args.child.endswith("-equal-data"):
        settings = override(settings, pairs=args.shots * 10)
    clip = load_clip(args.model, device=args.device)
    load_fmnist("train")  # data loading is not the defense's cost
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    defended = pipeline.defend(clip, method, config=settings, data=config.defender_data, suspect_dir=args.model)
    seconds = time.perf_counter() - start
    stats = defended.stats
    kind = "model" if defended.defense.rewrites_weights else "defense"
    pipeline.save(defended, Path(args.out) / kind)
    (Path(args.out) / "child.json").write_text(json.dumps({
        "method": args.child, "seconds": round(seconds, 2), "trainable_parameters": stats.get("trainable_parameters"),
        "data": getattr(settings, "pairs", None) or args.shots * 10, "loaded_rss_mb": round(loaded_rss, 1)}))


def run_child(method: str, args) -> dict:
    out = Path(args.out) / method
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", method, "--model", args.model, "--shots", str(args.shots),
               "--seed", str(args.seed), "--device", args.device, "--out", str(out)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{method} failed (status {status}): {' '.join(command)}")
    record = json.loads((out / "child.json").read_text())
    peak = usage.ru_maxrss / 1024
    return {**record, "process_wall_seconds": round(wall, 1), "peak_rss_mb": round(peak, 1),
            "defense_memory_mb": round(peak - record["loaded_rss_mb"], 1)}  # above the loaded model + data


def evaluate_output(method: str, args) -> dict:
    from clipguard.attacks import load_trigger
    from clipguard.data import load_fmnist
    from clipguard.defenses import load_defense
    from clipguard.eval.evaluate import evaluate_model
    from clipguard.models.loading import load_clip

    out = Path(args.out) / method
    if (out / "model").is_dir():
        clip, defense = load_clip(str(out / "model"), device=args.device), None
    else:
        clip = load_clip(args.model, device=args.device)
        defense = load_defense(out / "defense", clip, load_fmnist("test").classes)
    record = clip.config["attack"]
    result = evaluate_model(clip, method, limit=args.limit, seed=args.seed, trigger=load_trigger(args.model, record),
                            target=record["target"], defense=defense, progress=False)
    return {k: result[k] for k in ("clean_accuracy", "attack_success_rate")}


def eval_throughput(args) -> dict:
    """Images/s of ``evaluate_model`` (CA, 10k test images) vs a bare batched encode_image loop.

    The two are timed alternately ``args.repeats`` times and the medians compared: one ~20 s
    measurement of each varied by up to 24 % on this shared 2-core machine.
    """
    from clipguard.data import load_fmnist
    from clipguard.eval.evaluate import evaluate_model
    from clipguard.models.loading import load_clip

    clip = load_clip(args.model, device=args.device)
    test = load_fmnist("test")
    evaluate_model(clip, "warm-up", limit=1000, progress=False)
    ours, bare = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        evaluate_model(clip, args.model, progress=False)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, len(test), 1000):
                clip.encode_image(test.float_images(torch.arange(first, min(first + 1000, len(test)))).to(clip.device))
        bare.append(time.perf_counter() - start)
    ours_s, bare_s = statistics.median(ours), statistics.median(bare)
    return {"images": len(test), "repeats": args.repeats, "evaluate_seconds": [round(s, 2) for s in ours],
            "bare_loop_seconds": [round(s, 2) for s in bare],
            "evaluate_images_per_s": round(len(test) / ours_s, 1), "bare_images_per_s": round(len(test) / bare_s, 1),
            "overhead_percent": round(100 * (ours_s / bare_s - 1), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/bench/models/badnet-p0.03-s0", help="a backdoored model directory")
    parser.add_argument("--methods", nargs="*", default=list(COMPARED), choices=COMPARED,
                        help="defenses to time (none: only the evaluation throughput)")
    parser.add_argument("--repeats", type=int, default=3, help="alternate timings of evaluation vs the bare loop")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/cost")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {"model": args.model, "shots": args.shots, "seed": args.seed, "methods": {}}
    for method in args.methods:
        print(f"running {method} ...", flush=True)
        results["methods"][method] = {**run_child(method, args), **evaluate_output(method, args)}
    results["eval_throughput"] = eval_throughput(args)
    rows = results["methods"]
    print(f"{'method':<22} {'data':>6} {'defense s':>10} {'peak RSS MB':>12} {'above load':>11} {'ASR %':>7} {'CA %':>7}")
    for method, r in rows.items():
        print(f"{method:<22} {r['data']:>6} {r['seconds']:>10.1f} {r['peak_rss_mb']:>12.0f} {r['defense_memory_mb']:>11.0f} "
              f"{100 * r['attack_success_rate']['value']:>7.2f} {100 * r['clean_accuracy']['value']:>7.2f}")
    for reference in ("cleanclip", "cleanclip-equal-data"):
        for method in ("rvpt", "cbpt"):
            if reference in rows and method in rows:
                a, b = rows[reference], rows[method]
                ratio = {"time": round(a["seconds"] / b["seconds"], 2),
                         "memory": round(a["peak_rss_mb"] / b["peak_rss_mb"], 2),
                         # None: the defense never grew past the load-time peak (no ratio to give)
                         "memory_above_load": (round(a["defense_memory_mb"] / b["defense_memory_mb"], 2)
                                               if b["defense_memory_mb"] >= 1 else None)}
                results.setdefault("ratios", {})[f"{reference}/{method}"] = ratio
                print(f"{reference} / {method}: {ratio['time']}x the wall time, {ratio['memory']}x the peak RSS, "
                      + (f"{ratio['memory_above_load']}x the memory above the loaded model"
                         if ratio["memory_above_load"] is not None else f"{method} needs nothing above the loaded model"))
    t = results["eval_throughput"]
    print(f"eval throughput: {t['evaluate_images_per_s']} img/s vs bare loop {t['bare_images_per_s']} img/s "
          f"({t['overhead_percent']:+.1f}%)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cost.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}/cost.json")


if __name__ == "__main__":
    main()
