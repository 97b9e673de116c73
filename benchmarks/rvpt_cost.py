"""What RVPT's two shortcuts save: the prefix cache (training) and prompts as keys only (every pass).

1. The prefix cache: the same RVPT fit with and without it.

With the cache (what ``clipguard defend --method rvpt`` does), the unprompted blocks' output
and the frozen model's [CLS] states (the repelled targets) are computed once for the shots.
Without it, every step runs the frozen tower on its batch again (under ``no_grad``), as a
naive implementation would. Both runs use the same seed, batches and schedule, so their
losses must agree; the script checks that and prints the two wall times and their ratio.

2. Prompts as keys only (:func:`clipguard.models.prompted.prompted_block`): the fitted prompts'
zero-shot evaluation on ``--images`` test images, against the literal VPT-deep pass that
inserts the prompts into each block's sequence and drops their outputs; the script checks that
both give the same predictions and prints both throughputs.

    OMP_NUM_THREADS=1 python benchmarks/rvpt_cost.py --model runs/attacks/badnet-0.03 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import TensorDataset

import clipguard.models.prompted as prompted
from clipguard.config import override, parse_assignments
from clipguard.pipeline import draw_shots
from clipguard.defenses.rvpt import RVPT, RVPTConfig, RVPTTask
from clipguard.engine import fit
from clipguard.eval.evaluate import evaluate_model
from clipguard.models.zeroshot import class_text_features
from clipguard.models import load_clip
from clipguard.models.prompted import frozen_prefix


class _UncachedTask(RVPTTask):
    """RVPT's loss on raw pixels: the frozen prefix and targets are recomputed every step."""

    def forward(self, batch) -> torch.Tensor:
        pixels, labels = batch
        prefix, frozen_cls = frozen_prefix(self.visual, pixels, self.prompts.start_block)
        return super().forward((prefix, frozen_cls, labels))


def _literal_block(block, x, prompt, cls_only=False):
    """VPT-deep as written: every token through the block, prompts inserted, their outputs dropped."""
    out = block(x) if prompt is None else prompted.inserted_block(block, x, prompt)
    return out[:, :1] if cls_only else out


def eval_throughput(clip, defense, images: int, seed: int) -> tuple[float, dict]:
    """Images per second of a zero-shot evaluation (clean + triggered) with ``defense``."""
    result = evaluate_model(clip, "rvpt", limit=images, seed=seed, defense=defense, progress=False)
    return images / result["seconds"], result["clean_accuracy"]


def run(args, cached: bool) -> tuple[float, float, RVPT]:
    """One RVPT fit: ``RVPT.fit`` itself (cached), or the same loss recomputing the frozen tower."""
    clip = load_clip(args.model, device="cpu").eval()
    shots = draw_shots(args.shots, args.seed)
    config = override(RVPTConfig(shots=args.shots, seed=args.seed, device="cpu"),
                      **parse_assignments(RVPTConfig, args.set or []))
    defense = RVPT(config, clip, shots.classes)
    if cached:
        stats = defense.fit(clip, shots)
        return stats["seconds"], stats["last_loss"], defense
    clip.requires_grad_(False)
    start = time.perf_counter()
    texts = class_text_features(clip, shots.classes, templates=(config.prompt,)).clone()
    task = _UncachedTask(defense.prompts, clip, texts, config, None)
    dataset = TensorDataset(clip.preprocess(shots.float_images()), shots.labels)
    result = fit(task, dataset, defense.train_config(len(dataset)), desc="rvpt uncached")
    defense.eval()
    return time.perf_counter() - start, result.last_loss, defense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a (backdoored) model directory or spec")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=2000, help="test images for the throughput comparison")
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE", help="RVPT config field, repeatable")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cached_seconds, cached_loss, defense = run(args, cached=True)
    uncached_seconds, uncached_loss, _ = run(args, cached=False)
    if abs(cached_loss - uncached_loss) > 1e-4 * max(1.0, abs(cached_loss)):
        raise SystemExit(f"the two runs disagree: last loss {cached_loss} vs {uncached_loss}")
    clip = load_clip(args.model, device="cpu").eval()
    fast_rate, fast_ca = eval_throughput(clip, defense, args.images, args.seed)
    keys_only, prompted.prompted_block = prompted.prompted_block, _literal_block
    try:
        literal_rate, literal_ca = eval_throughput(clip, defense, args.images, args.seed)
    finally:
        prompted.prompted_block = keys_only
    if fast_ca["correct"] != literal_ca["correct"]:
        raise SystemExit(f"the two passes disagree: {fast_ca['correct']} vs {literal_ca['correct']} correct")
    print(json.dumps({
        "fit_cached_seconds": round(cached_seconds, 2), "fit_uncached_seconds": round(uncached_seconds, 2),
        "prefix_cache_speedup": round(uncached_seconds / cached_seconds, 2), "last_loss": cached_loss,
        "eval_images_per_second_keys_only": round(fast_rate, 1), "eval_images_per_second_literal": round(literal_rate, 1),
        "keys_only_speedup": round(fast_rate / literal_rate, 2), "clean_correct": fast_ca["correct"],
    }))


if __name__ == "__main__":
    main()
