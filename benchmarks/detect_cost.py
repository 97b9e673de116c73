"""Time and peak memory of ``clipguard detect`` at real scale, with a projected GPU time.

Two measurements, each ``clipguard detect`` run as a child process (``os.wait4`` gives its wall
time, CPU time and peak resident memory ``ru_maxrss``; tracemalloc misses torch's allocations):

  * a randomly initialised open_clip ``ViT-B-32`` (``open_clip.create_model("ViT-B-32")``, no
    pretrained weights, saved as ``ViT-B-32:WORK/vit-b-32-random.safetensors``) at 224 px on a
    generated ``imagenet:DIR`` of ``--classes`` synset folders (OpenAI's class names and 80
    templates) with ``--shots`` random JPEGs each (16,000 files at 1,000 classes);
  * the built-in model on Fashion-MNIST (``--model builtin``, 10 classes, 16 shots).

The projection: the CPU cost of one inversion step, a forward and backward pass of the image
encoder through ``--step-images`` images at 224 px, is measured here; detect's CPU wall time
divided by it gives its work in step-equivalents, and ``--gpu-images-per-second`` (an
assumption, not a measurement: stated in the output) turns that into GPU seconds. Decoding the
JPEGs and encoding the prompts are counted in the same units, which overstates their GPU share.

    python benchmarks/detect_cost.py --work runs/detect-cost --classes 100     # a scaled-down run
    python benchmarks/detect_cost.py --work runs/detect-cost --classes 1000    # ViT-B-32, 1,000 ImageNet classes x 16 shots
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BLOBS = 256  # distinct random JPEGs; the files cycle through them (generation stays fast)


def generate_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    """``classes`` ImageNet synset folders of ``per_class`` random JPEGs each; reused when complete."""
    import numpy as np
    from PIL import Image
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()[:classes]
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{classes} {per_class} {size}":
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(BLOBS):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=75)
        blobs.append(buffer.getvalue())
    for c, synset in enumerate(synsets):
        folder = root / synset
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{i:03d}.jpg").write_bytes(blobs[(c * per_class + i * 7) % BLOBS])
    done.write_text(f"{classes} {per_class} {size}")
    return root


def random_vit(path: Path) -> str:
    """A randomly initialised ViT-B-32 as a safetensors state dict; its ``--model`` spec."""
    if not path.is_file():
        import open_clip
        import torch
        from safetensors.torch import save_file

        from clipguard.outputs import atomic_write

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return f"ViT-B-32:{path}"


def measured_child(command: list[str], timeout: float, log: Path) -> dict:
    """Run ``command`` (its output to ``log``); its wall and CPU seconds, peak RSS (MiB) and exit
    status (None: killed at ``timeout``)."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > timeout:
            child.kill()
            pid, status, usage = os.wait4(child.pid, 0)
            status = None
            break
        time.sleep(0.5)
    child.returncode = 0  # reaped by wait4 above; keeps Popen from waiting again
    output = log.read_text(errors="replace").replace("\r", "\n")
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit": None if status is None else os.waitstatus_to_exitcode(status),
            "last_line": (output.strip().splitlines() or [""])[-1][:300]}


def detector_seconds(record: dict) -> dict[str, float]:
    """Seconds per detector if detect's JSON reports them (``detectors``: a dict or a list of dicts)."""
    items = record.get("detectors")
    if isinstance(items, dict):
        items = [{"name": k, **v} for k, v in items.items() if isinstance(v, dict)]
    found = {str(item.get("name") or item.get("detector")): float(item["seconds"]) for item in items or []
             if isinstance(item, dict) and isinstance(item.get("seconds"), (int, float))}
    calibration = record.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("seconds"), (int, float)):
        found["calibration"] = float(calibration["seconds"])
    if isinstance(record.get("seconds"), (int, float)):
        found["all"] = float(record["seconds"])
    return found


def step_cost(images: int, size: int, repeats: int) -> float:
    """CPU seconds of one forward + backward pass of the random ViT-B-32 image encoder through
    ``images`` images at ``size`` px (the gradient w.r.t. the input, as an inversion takes it)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32").visual.eval()
    visual.requires_grad_(False)
    batch = torch.rand(images, 3, size, size, requires_grad=True)
    visual(batch).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        visual(batch).sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the generated images, weights and outputs")
    parser.add_argument("--classes", type=int, default=1000, help="ImageNet classes (synset folders)")
    parser.add_argument("--shots", type=int, default=16, help="images per class, all used as shots")
    parser.add_argument("--jpeg-size", type=int, default=64, help="side of the generated JPEGs (the loader resizes to 224)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a detect run is stopped")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--detect-arg", action="append", default=[], help="passed to both detect runs, repeatable")
    parser.add_argument("--step-images", type=int, default=64, help="images per inversion step (32 triggered + 32 clean)")
    parser.add_argument("--gpu-images-per-second", type=float, default=1500.0,
                        help="ASSUMED ViT-B/32 forward+backward throughput of one GPU at 224 px, fp32 (for the projection)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clipguard = str(Path(sys.executable).with_name("clipguard"))
    results = {"threads": os.environ.get("OMP_NUM_THREADS", "torch default"), "cores": os.cpu_count()}
    runs = []
    if not args.skip_builtin:
        runs.append(("builtin", ["--model", "builtin"]))
    if not args.skip_vit:
        start = time.perf_counter()
        folder = generate_folder(work / f"imagenet-{args.classes}x{args.shots}", args.classes, args.shots, args.jpeg_size)
        spec = random_vit(work / "vit-b-32-random.safetensors")
        results["generation_s"] = round(time.perf_counter() - start, 1)
        runs.append((f"vit-b-32-{args.classes}", ["--model", spec, "--dataset", f"imagenet:{folder}"]))
    for name, flags in runs:
        out = work / f"{name}.png"
        measured = measured_child([clipguard, "detect", *flags, "--shots", str(args.shots), "--seed", "0",
                                   "--device", args.device, *args.detect_arg, "--out", str(out)], args.timeout,
                                  work / f"{name}.log")
        record = out.with_suffix(".json")
        if measured["exit"] == 0 and record.is_file():
            data = json.loads(record.read_text())
            measured["detector_seconds"] = detector_seconds(data)
            measured["verdict"] = data.get("verdict", data.get("backdoored"))
        results[name] = measured
        print(json.dumps({name: measured}), flush=True)
    if not args.skip_vit:
        seconds = step_cost(args.step_images, 224, 3)
        results["cpu_step_s"] = round(seconds, 3)
        results["cpu_images_per_s"] = round(args.step_images / seconds, 1)
        vit = results[f"vit-b-32-{args.classes}"]
        steps = vit["wall_s"] / seconds
        gpu_step = args.step_images / args.gpu_images_per_second
        results["projection"] = {
            "step_equivalents": round(steps), "assumed_gpu_images_per_s": args.gpu_images_per_second,
            "projected_gpu_s": round(steps * gpu_step, 1),
            "finished": vit["exit"] == 0,
            "note": ("detect's CPU wall time / the CPU cost of one step (forward + backward of the image "
                     f"encoder through {args.step_images} images at 224 px), times the GPU cost of that step at "
                     f"the assumed {args.gpu_images_per_second:g} images/s; a lower bound when the run was stopped"),
        }
    (work / "cost.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"wrote {work / 'cost.json'}")


if __name__ == "__main__":
    main()
