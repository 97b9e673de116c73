"""Does trigger inversion find the attacker's patch? Mask mass inside the true patch, per TV weight.

For each patch-trigger model (BadNet, BadCLIP: bottom-right corner; TrojVQA: centre) and each
``--tv`` weight of the inversion's total-variation term: one inversion per seed on 16 clean
train shots per class, then the found target, the collapse score, the mask area and the share
of the mask's mass that lies inside the true patch (a uniform mask gives the patch's share of
the image, printed beside it).

    OMP_NUM_THREADS=1 python benchmarks/inversion_fidelity.py --runs runs/attacks --tv 0 1 5 20
"""

from __future__ import annotations

import argparse
import json

import torch

from clipguard.attacks import load_trigger
from clipguard.attacks.patch import patch_mask
from clipguard.pipeline import draw_shots
from clipguard.detection.inversion import InversionConfig, invert_trigger
from clipguard.models import load_clip

LOCATIONS = {"badnet": None, "badclip": None, "trojvqa": "center"}  # None: read from the trigger config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs/attacks", help="directory holding ATTACK-0.03 model directories")
    parser.add_argument("--attacks", nargs="*", default=list(LOCATIONS))
    parser.add_argument("--tv", nargs="*", type=float, default=[0.0, 1.0, 5.0, 20.0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1], help="inversion seeds")
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shots = draw_shots(args.shots, 0)
    for name in args.attacks:
        model = f"{args.runs}/{name}-0.03"
        clip = load_clip(model, device="cpu")
        trigger = load_trigger(model, clip.config["attack"])
        truth = patch_mask(shots.image_size, trigger.patch.shape[-1], LOCATIONS[name] or trigger.config.location)
        for tv in args.tv:
            for seed in args.seeds:
                r = invert_trigger(clip, shots, InversionConfig(tv_weight=tv, seed=seed, device="cpu"))
                inside = float((r.mask * truth).sum() / r.mask.sum())  # share of the mask's mass in the patch
                print(json.dumps({
                    "model": name, "tv": tv, "seed": seed, "target": r.target_name, "collapse": round(r.collapse, 3),
                    "area": round(r.mask_area, 4), "mass_in_patch": round(inside, 3),
                    "patch_share_of_image": round(float(truth.float().mean()), 4), "seconds": round(r.seconds, 1),
                }), flush=True)


if __name__ == "__main__":
    main()
