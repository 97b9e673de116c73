"""The oracle-guided repair table (EftCLIP, docs/methods.md) on backdoored built-in models.

For every ``<attack>-<rate>`` model directory under --runs: build the defender's pool, run
``oracle_repair``, save the repaired model + report under --out/<attack>, and measure

  * victim label right? (the attack's target, and nothing else)
  * IoU of the found region with the true trigger (mask IoU; share of detected true victims
    with IoU >= 0.5, and the mean)
  * victims found / present, precision and recall of victim-sample detection on the pool
  * compact set size, CA and ASR before and after (full Fashion-MNIST test split), time.

Pool (stated, seeded): --pool-size images drawn from the Fashion-MNIST *train* split with
seed --seed (the train split, so the test split that CA/ASR are measured on stays unseen by
the repair); the attack's own trigger is applied to a seeded --trigger-rate share of them,
of all classes. "Present" victims = triggered pool images of non-target classes (target-class
images are excluded, as for ASR); precision counts a detection as right when the image was
triggered.

    OMP_NUM_THREADS=1 nice python benchmarks/oracle_repair_table.py --runs runs/attacks \\
        --out runs/oracle_repair
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from _tables import markdown_table
from clipguard.attacks import load_trigger
from clipguard.attacks.patch import patch_mask
from clipguard.data import FMNIST_CLASSES, load_fmnist
from clipguard.data.pool import load_pool
from clipguard.defenses.oracle_repair.oracle import mask_box
from clipguard.defenses.oracle_repair import OracleRepairConfig, oracle_repair, save_repaired_model, write_repair_report
from clipguard.defenses.oracle_repair.trigger_search import zero_shot_probabilities
from clipguard.eval.evaluate import evaluate_model
from clipguard.models.zeroshot import class_text_features
from clipguard.models import load_clip

VISIBLE = ("badnet", "badnet-lc", "trojvqa", "badclip")


def build_pool(trigger, size: int, rate: float, seed: int):
    """(images (N, 3, H, W), labels (N,), triggered (N,) bool, true masks (N, H, W) bool)."""
    images, info = load_pool(f"fmnist-train:{size}", 28, seed, trigger, rate)
    clean, _ = load_pool(f"fmnist-train:{size}", 28, seed)
    train = load_fmnist("train")
    labels = train.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:size]]
    triggered = torch.zeros(size, dtype=torch.bool)
    triggered[info["triggered"]] = True
    masks = torch.zeros(size, *images.shape[-2:], dtype=torch.bool)
    location = getattr(trigger.config, "location", None)
    if hasattr(trigger, "patch") and location not in (None, "random"):  # a fixed patch, maybe in several places
        masks[triggered] = patch_mask(images.shape[-1], trigger.patch.shape[-1], location)
        return images, labels, triggered, masks
    changed = (images - clean).abs().amax(1) > 1e-6  # (N, H, W)
    for i in info["triggered"]:  # a patch: the box of the pixels it changed
        if changed[i].any():
            top, left, bottom, right = mask_box(changed[i])
            masks[i, top:bottom, left:right] = True
    return images, labels, triggered, masks


def metrics(report: dict, labels, triggered, masks, predictions, target: int, target_name: str) -> dict:
    present = triggered & (labels != target)
    fired = present & (predictions == target)
    found = {v["image"]: v for v in report["victim_samples"]}
    true_found = [i for i in found if present[i]]
    ious = []
    for i in true_found:
        mask = torch.zeros(masks[i].numel(), dtype=torch.bool)
        mask[found[i]["pixels"]] = True
        mask = mask.view_as(masks[i])
        ious.append(int((mask & masks[i]).sum()) / max(1, int((mask | masks[i]).sum())))
    return {
        "victim_label_right": report["victim_labels"] == [target_name],
        "found": len(found), "true_found": len(true_found), "present": int(present.sum()), "fired": int(fired.sum()),
        "fired_found": sum(1 for i in found if fired[i]),
        "precision": len(true_found) / len(found) if found else float("nan"),
        "recall": len(true_found) / max(1, int(present.sum())),
        "iou_share_05": sum(x >= 0.5 for x in ious) / len(ious) if ious else float("nan"),
        "iou_mean": sum(ious) / len(ious) if ious else float("nan"),
    }


def rates(record: dict) -> tuple[float, float]:
    return 100 * record["clean_accuracy"]["value"], 100 * record["attack_success_rate"]["value"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs/attacks")
    parser.add_argument("--rate", default="0.03", help="poison rate in the model directory names")
    parser.add_argument("--attacks", nargs="*", help="default: every <attack>-<rate> directory present")
    parser.add_argument("--pool-size", type=int, default=2000)
    parser.add_argument("--trigger-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/oracle_repair")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="OracleRepairConfig field")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = {f.name: f.type for f in fields(OracleRepairConfig)}
    overrides = {}
    for item in args.set:
        name, _, raw = item.partition("=")
        overrides[name] = {"int": int, "float": float, "str": str}.get(str(kinds[name]), json.loads)(raw)
    config = OracleRepairConfig(seed=args.seed, device="cpu", **overrides)
    dirs = sorted(Path(args.runs).glob(f"*-{args.rate}"))
    if args.attacks:
        dirs = [d for d in dirs if d.name.rsplit("-", 1)[0] in args.attacks]
    rows = []
    for model_dir in dirs:
        if not (model_dir / "eval.json").exists():
            continue
        attack = model_dir.name.rsplit("-", 1)[0]
        clip = load_clip(str(model_dir))
        record = clip.config["attack"]
        trigger, target = load_trigger(model_dir, record), record["target"]
        images, labels, triggered, masks = build_pool(trigger, args.pool_size, args.trigger_rate, args.seed)
        texts = class_text_features(clip, load_fmnist("test").classes)
        predictions = zero_shot_probabilities(clip, images, texts).argmax(-1)
        before = evaluate_model(clip, str(model_dir), seed=args.seed, trigger=trigger, target=target, progress=False)
        start = time.perf_counter()
        repaired, report = oracle_repair(clip, images, config)
        seconds = time.perf_counter() - start
        after = before
        if report["model_changed"]:
            after = evaluate_model(repaired, "repaired", seed=args.seed, trigger=trigger, target=target, progress=False)
        out = Path(args.out) / attack
        save_repaired_model(repaired, report, out, model_dir)
        write_repair_report(report, images, out)
        row = {"attack": attack, "verdict": report["verdict"], "victim_labels": report["victim_labels"],
               "compact_set_size": report["compact_set_size"], "seconds": round(seconds, 1),
               "before": before, "after": after, "label_tests": report["label_tests"],
               **metrics(report, labels, triggered, masks, predictions, FMNIST_CLASSES.index(target), target)}
        (out / "benchmark.json").write_text(json.dumps(row, indent=2, default=str))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("before", "after")}, default=str), flush=True)
    print(f"\npool: {args.pool_size} Fashion-MNIST train images (seed {args.seed}), {100 * args.trigger_rate:g}% "
          f"triggered; config: {config}\n")
    cells = []
    for r in rows:
        ca0, asr0 = rates(r["before"])
        ca1, asr1 = rates(r["after"])
        drop = 100 * (asr0 - asr1) / asr0 if asr0 else float("nan")
        right = "n/a" if not r["victim_labels"] else ("yes" if r["victim_label_right"] else f"no {r['victim_labels']}")
        iou = f"{100 * r['iou_share_05']:.0f}% ({r['iou_mean']:.2f})" if r["true_found"] else "-"
        precision = f"{100 * r['precision']:.1f}%" if r["found"] else "-"
        cells.append([r["attack"], r["verdict"], right, iou, f"{r['true_found']}/{r['present']} ({r['found']} flagged)",
                      precision, f"{100 * r['recall']:.1f}%", r["compact_set_size"], f"{ca0:.2f} -> {ca1:.2f}",
                      f"{asr0:.2f} -> {asr1:.2f} ({drop:.1f}%)", f"{r['seconds']:.0f} s"])
    print(markdown_table(["attack", "verdict", "victim label right?", "IoU>=0.5 (mean)", "victims found/present",
                          "precision", "recall", "compact set", "CA before -> after", "ASR before -> after (rel. drop)",
                          "time"], cells))
    print("\nASR counts triggered test images of non-target classes only (target-class images excluded).")


if __name__ == "__main__":
    sys.exit(main())
