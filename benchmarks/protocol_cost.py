"""What the defenses cost at the public protocol's sizes, measured on a randomly initialised
open_clip ``ViT-B-32`` at 224 px (the decode-free compute of OpenAI's ViT-B/32; nothing downloaded).

Per method, one training step on a batch of random images and distinct captions, forward,
backward and optimiser step:
  * cleanclip: the whole model, CLIP loss + in-modal terms (two image and two text views);
  * par: the whole model, CLIP loss + the repulsion from a frozen copy (one view, two towers);
  * rvpt: the deep visual prompts on cached prefix tokens, the last block on [CLS] alone; plus,
    once per shot, the frozen prefix pass that makes the cache;
  * rvpt-all-tokens: the same step with the last block over every token (RVPT before that cut);
  * cbpt: one prompt step (the text tower over the C class prompts, on cached image features;
    every CBPT step covers all shots); plus, once per shot, the image feature pass.
The class features RVPT and CBPT compare with are random unit vectors: their values do not change
the cost. CBPT's trigger inversion is not included. The steps are timed alternately (round robin,
``--rounds`` times) in one process, so every method
sees the same machine load; each method's peak RSS is measured in a child process of its own.
The floating-point operations of one step (forward and backward, torch's FlopCounterMode) are
counted too: they do not depend on the machine.

Projections (the docs' sizes): CleanCLIP 100k and 250k pairs x 10 epochs; PAR 250k pairs x 2
epochs; RVPT 16,000 shots x 50 epochs plus one prefix pass; CBPT its ``steps`` prompt steps plus
one feature pass.

    OMP_NUM_THREADS=2 python benchmarks/protocol_cost.py --batch-size 16 --rounds 3 --classes 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

COMPARED = ("cleanclip", "par", "rvpt", "rvpt-all-tokens", "cbpt")
PER_SAMPLE = ("cleanclip", "par", "rvpt", "rvpt-all-tokens")


def build(method: str, model: str, batch: int, classes: int):
    """(step function, per-shot setup function or None) for ``method`` on ``model``."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from clipguard.defenses.cbpt.cbpt import CBPT, CBPTConfig, _PromptTask
    from clipguard.defenses.cleanclip import _CleanCLIPTask
    from clipguard.defenses.par import PARConfig, _PARTask
    from clipguard.defenses.rvpt import RVPT, RVPTConfig, RVPTTask
    from clipguard.models import load_clip
    from clipguard.models.prompted import frozen_prefix

    torch.manual_seed(0)
    clip = load_clip(model).train()
    size = clip.image_size
    names = tuple(IMAGENET_CLASSNAMES[:classes]) if classes <= 1000 else tuple(f"class {i}" for i in range(classes))
    images = torch.rand(batch, 3, size, size)
    tokens = clip.tokenize([f"a photo of a {names[i % len(names)]} number {i}" for i in range(batch)])
    labels = torch.arange(batch) % len(names)

    def stepper(task, params, batch_data):
        optimizer = torch.optim.AdamW(params, lr=1e-6)

        def step():
            loss = task(batch_data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    if method in ("cleanclip", "par"):
        clip.requires_grad_(True)
        params = [p for p in clip.parameters() if p.requires_grad]
        if method == "cleanclip":
            views = (torch.rand_like(images), clip.tokenize([f"a {names[i % len(names)]}" for i in range(batch)]))
            return stepper(_CleanCLIPTask(clip, 1.0), params, (images, tokens, *views)), None
        frozen = load_clip(model).eval().requires_grad_(False)
        return stepper(_PARTask(clip, frozen, PARConfig()), params, (images, tokens)), None
    clip.eval().requires_grad_(False)
    if method.startswith("rvpt"):
        defense = RVPT(RVPTConfig(device="cpu"), clip, names)
        defense.prompts.cls_only = method == "rvpt"
        pixels = clip.preprocess(images)
        prefix, frozen_cls = frozen_prefix(clip.model.visual, pixels, defense.prompts.start_block)
        texts = torch.nn.functional.normalize(torch.randn(len(names), clip.embed_dim), dim=-1)
        task = RVPTTask(defense.prompts, clip, texts, defense.config, None)
        setup = lambda: frozen_prefix(clip.model.visual, pixels, defense.prompts.start_block)  # noqa: E731
        return stepper(task, list(defense.prompts.parameters()), (prefix, frozen_cls, labels)), setup
    defense = CBPT(CBPTConfig(device="cpu"), clip, names)
    with torch.no_grad():
        features = clip.encode_image(images, normalize=True)
    handcrafted = torch.nn.functional.normalize(torch.randn(len(names), clip.embed_dim), dim=-1)
    task = _PromptTask(defense.prompts, clip, handcrafted, beta=3.0, gamma=0.3)
    triggered = features[:, None]  # one dummy trigger per shot
    setup = lambda: clip.encode_image(images, normalize=True)  # noqa: E731
    return stepper(task, list(defense.prompts.parameters()), (features, triggered, labels)), setup


def timed(function, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def step_flops(step) -> int:
    """Floating-point operations of one call of ``step``: the matrix products (torch counts no CPU attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def memory_child(method: str, args) -> float:
    """Peak RSS (MB) of a child process that builds ``method`` and runs two steps."""
    command = [sys.executable, __file__, "--child", method, "--model", args.model, "--batch-size",
               str(args.batch_size), "--classes", str(args.classes)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{method}: the child failed ({status})")
    return round(usage.ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=1000, help="class prompts (ImageNet: 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(COMPARED))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, _ = build(args.child, args.model, args.batch_size, args.classes)
        step()
        step()
        return
    # children first: a child's peak RSS counts its parent's at the fork (Linux keeps it across exec)
    memory = {m: memory_child(m, args) for m in args.methods}
    built = {m: build(m, args.model, args.batch_size, args.classes) for m in args.methods}
    flops = {m: step_flops(step) for m, (step, _) in built.items()}  # also the warm-up
    seconds = {m: [] for m in args.methods}
    setup_seconds = {}
    for _ in range(args.rounds):  # alternately: each round times every method once
        for method, (step, _) in built.items():
            seconds[method].append(timed(step))
    for method, (_, setup) in built.items():
        if setup is not None:
            with torch.no_grad():
                setup_seconds[method] = timed(setup, 2)
    b = args.batch_size
    rows = {}
    for method in args.methods:
        step_s = statistics.median(seconds[method])
        row = {"step_s": round(step_s, 3), "steps_s": [round(s, 3) for s in seconds[method]],
               "peak_rss_mb": memory[method], "step_gflop": round(flops[method] / 1e9, 1)}
        if method in PER_SAMPLE:
            row["ms_per_sample"] = round(1000 * step_s / b, 1)
            row["gflop_per_sample"] = round(flops[method] / 1e9 / b, 2)
        if method in setup_seconds:
            row["setup_ms_per_shot"] = round(1000 * setup_seconds[method] / b, 1)
        rows[method] = row
    hours = {}
    if "cleanclip" in rows:
        for pairs in (100_000, 250_000):
            hours[f"cleanclip {pairs // 1000}k pairs x 10 epochs"] = rows["cleanclip"]["ms_per_sample"] * pairs * 10 / 3.6e6
    if "par" in rows:
        hours["par 250k pairs x 2 epochs"] = rows["par"]["ms_per_sample"] * 250_000 * 2 / 3.6e6
        hours["par 100k pairs x 2 epochs"] = rows["par"]["ms_per_sample"] * 100_000 * 2 / 3.6e6
    for method in ("rvpt", "rvpt-all-tokens"):
        if method in rows:
            hours[f"{method} 16k shots x 50 epochs + prefix"] = (
                rows[method]["ms_per_sample"] * 16_000 * 50 + rows[method]["setup_ms_per_shot"] * 16_000) / 3.6e6
    if "cbpt" in rows:
        from clipguard.defenses.cbpt.cbpt import CBPTConfig

        steps = CBPTConfig().steps
        hours[f"cbpt {steps} prompt steps + features of 16k shots (no inversion)"] = (
            rows["cbpt"]["step_s"] * steps + rows["cbpt"]["setup_ms_per_shot"] * 16_000 / 1000) / 3600
    print(json.dumps({"model": args.model, "batch_size": b, "classes": args.classes, "threads": torch.get_num_threads(),
                      "methods": rows, "projected_hours": {k: round(v, 2) for k, v in hours.items()}}, indent=1))


if __name__ == "__main__":
    main()
