"""Does evaluating a user's ImageFolder stream? Wall time and peak memory against folder size,
and throughput against a bare torchvision loop.

Generates ImageFolders of Fashion-MNIST test images, tinted and upscaled to 256 px JPEGs (nothing
is committed: they go under --work), then runs, each in a fresh process (peak RSS from wait4):
  * ``clipguard evaluate --dataset DIR --limit 10`` for each size: only 10 images may be decoded;
  * ``clipguard evaluate --dataset DIR`` (every image) for each size: wall time should grow
    linearly and peak RSS stay flat;
  * a bare loop, torchvision ``ImageFolder`` + ``DataLoader`` + ``encode_image`` with the same
    batch size and workers, on the smallest folder, timed alternately with clipguard's.

    python benchmarks/folder_scale.py --sizes 2000 8000 --work runs/folder_scale
    python benchmarks/folder_scale.py --model ViT-B-32 --sizes 500 --batch-size 100 --skip-scale --work runs/folder_scale

``--model ViT-B-32`` is open_clip's architecture with random weights, at 224 px (nothing is
downloaded): the same decode and encode cost as OpenAI's ViT-B/32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _tables import markdown_table


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` test images (balanced over classes), tinted and upscaled to 256 px JPEGs."""
    from clipguard.data import load_fmnist

    if (root / "done").is_file():
        return root
    test = load_fmnist("test")
    rng = np.random.default_rng(seed)
    for i in range(count):
        index = i % len(test)
        name = test.classes[int(test.labels[index])].replace(" ", "_")
        grey = test.images[index, 0].numpy().astype(np.float32) / 255
        tint = rng.uniform(0.5, 1.0, size=3)
        rgb = (grey[..., None] * tint * 255).astype(np.uint8)
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).resize((256, 256), Image.BICUBIC).save(root / name / f"{i:06d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def timed(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of ``command`` in a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    out = process.stdout.read()
    if status:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "out": out}


BARE = """
import sys, time, torch, torchvision
from torchvision import transforms
from clipguard.models import load_clip
root, workers, batch, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
clip = load_clip(model)
size = clip.image_size
tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                         transforms.CenterCrop(size), transforms.ToTensor()])
data = torchvision.datasets.ImageFolder(root, tf)
loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers)
correct = 0
with torch.inference_mode():
    for images, labels in loader:
        clip.encode_image(images, normalize=True)
print(len(data))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--work", default="runs/folder_scale")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="alternate clipguard / bare loop this many times")
    parser.add_argument("--model", default="builtin", help="builtin, or ViT-B-32 (random weights, 224 px)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--skip-scale", action="store_true", help="only the comparison with the bare loop")
    args = parser.parse_args()
    work = Path(args.work)
    workers = args.workers
    clipguard = [sys.executable, "-m", "clipguard.cli", "evaluate", "--device", "cpu", "--batch-size",
                 str(args.batch_size), "--model", args.model, "--workers", str(workers)]
    rows = []
    for size in [] if args.skip_scale else args.sizes:
        folder = make_folder(work / f"folder-{size}", size)
        limited = timed([*clipguard, "--dataset", str(folder), "--limit", "10"])
        full = timed([*clipguard, "--dataset", str(folder)])
        rows.append({"images": size, "limit10": {k: v for k, v in limited.items() if k != "out"},
                     "all": {k: v for k, v in full.items() if k != "out"}, "summary": full["out"].strip()})
        print(json.dumps(rows[-1]), flush=True)
    smallest = make_folder(work / f"folder-{min(args.sizes)}", min(args.sizes))
    ratios = []
    for _ in range(args.repeats):  # alternately, so both see the same machine load
        ours = timed([*clipguard, "--dataset", str(smallest)])["seconds"]
        bare = timed([sys.executable, "-c", BARE, str(smallest), str(workers), str(args.batch_size),
                      args.model])["seconds"]
        ratios.append({"clipguard_s": ours, "bare_s": bare, "ratio": round(ours / bare, 3)})
        print(json.dumps(ratios[-1]), flush=True)
    print("\n" + markdown_table(["images", "--limit 10: wall s", "peak RSS MB", "all images: wall s", "peak RSS MB"],
                                [[f"{row['images']:,}", row["limit10"]["seconds"], row["limit10"]["peak_rss_mb"],
                                  row["all"]["seconds"], row["all"]["peak_rss_mb"]] for row in rows]))
    print(f"\n{args.model}: clipguard / bare torchvision loop on {min(args.sizes):,} images ({workers} workers, batch "
          f"{args.batch_size}): " + ", ".join(f"{r['ratio']} ({r['clipguard_s']} s / {r['bare_s']} s)" for r in ratios))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
