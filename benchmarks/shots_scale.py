"""Does a few-shot defense decode only its shots? ``clipguard defend --method rvpt --shots 16`` on a
folder whose train/ split holds 20,000 images (and val/ 500), counting every image decoded.

The folders are Fashion-MNIST test images tinted and upscaled to 256 px JPEGs (generated under
--work, nothing committed). The command runs in this process with ``read_image`` wrapped by a
counter shared with the DataLoader workers (a fork-inherited ``multiprocessing.Value``).

    python benchmarks/shots_scale.py --train-images 20000 --work runs/shots_scale
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

from folder_scale import make_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--work", default="runs/shots_scale")
    parser.add_argument("--epochs", type=int, default=2, help="RVPT epochs (the decoding does not depend on them)")
    args = parser.parse_args()
    work = Path(args.work)
    root = work / f"split-{args.train_images}"
    make_folder(root / "train", args.train_images)
    make_folder(root / "val", args.val_images, seed=1)

    import clipguard.data.folders as folders
    from clipguard.cli import main as clipguard

    decoded = multiprocessing.Value("l", 0)
    real = folders.read_image

    def counted(path, size, fit="crop"):
        with decoded.get_lock():
            decoded.value += 1
        return real(path, size, fit)

    folders.read_image = counted
    out = work / "defense"  # clipguard defend replaces its own output of an earlier run
    start = time.perf_counter()
    code = clipguard(["defend", "--method", "rvpt", "--shots", "16", "--dataset", str(root), "--set",
                      f"epochs={args.epochs}", "--device", "cpu", "--out", str(out)])
    seconds = time.perf_counter() - start
    stats = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    print(json.dumps({"exit": code, "train_images": args.train_images, "val_images": args.val_images,
                      "decoded": decoded.value, "expected": 16 * 10 + args.val_images, "wall_seconds": round(seconds, 1),
                      "fit_seconds": stats.get("stats", {}).get("seconds")}))


if __name__ == "__main__":
    main()
