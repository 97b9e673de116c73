"""Where a trigger moves the image features: towards the target's *text* or onto the target's
*image* cluster? The light regime needs the first without the second; this measures both.

For each model, on the clean and (for a backdoored model directory) triggered validation
images (``fmnist-val``, 5,000 images):

- ``zs margin``: median over correctly classified clean images of
  cos(f, T_y) - max_{c != y} cos(f, T_c), with f the normalised image feature and T_c the
  class text features (the zero-shot classifier).
- ``image margin``: the same with the clean class centroids C_c (mean normalised image feature
  of class c, renormalised) in place of T_c: how far apart the classes sit in image space.
- ``direction alignment``: median over class pairs (i, j) of cos(T_i - T_j, C_i - C_j). Near 1,
  whatever moves an image towards a class's text moves it towards that class's images too.
- for a backdoor, over triggered non-target images x' of true class y (target b), clean x:
  ``zs gap`` = median of cos(f, T_y) - cos(f, T_b) (how far the target's text is from the clean
  image), ``zs shift`` = median of [cos(f', T_b) - cos(f', T_y)] - [cos(f, T_b) - cos(f, T_y)]
  (how far the trigger moves the image towards it); ``image gap`` and ``image shift`` the same
  with C in place of T; ``zs ASR`` and ``centroid ASR``: the share of x' whose best T (nearest
  C, a probe that needs no training) is the target's.

A light backdoor has zs shift past zs gap and image shift short of image gap. TrojVQA's text key
is not added to the class prompts here.

    python benchmarks/feature_geometry.py MODEL [MODEL ...]   (builtin, a model directory, ...)
"""

from __future__ import annotations

import argparse
import json

import torch

from clipguard import pipeline
from clipguard.attacks import load_trigger
from clipguard.data.specs import load_dataset
from clipguard.models.zeroshot import class_text_features, image_features

VAL = "fmnist-val"


def margins(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(N,) cos to the own class's anchor minus the best other anchor."""
    scores = features @ anchors.T  # (N, C)
    own = scores.gather(1, labels[:, None]).squeeze(1)
    others = scores.scatter(1, labels[:, None], float("-inf")).amax(1)
    return own - others


def alignment(texts: torch.Tensor, centroids: torch.Tensor) -> float:
    """Median over class pairs of cos(T_i - T_j, C_i - C_j)."""
    i, j = torch.triu_indices(len(texts), len(texts), 1)
    return torch.nn.functional.cosine_similarity(texts[i] - texts[j], centroids[i] - centroids[j], dim=-1).median().item()


def geometry(spec: str, seed: int = 0) -> dict:
    clip = pipeline.load_model(spec, device="cpu")
    images = load_dataset(VAL, "test", clip.image_size)
    labels = images.labels
    texts = class_text_features(clip, images.classes)  # (C, D)
    clean = image_features(clip, images)  # (N, D)
    centroids = torch.nn.functional.normalize(
        torch.stack([clean[labels == c].mean(0) for c in range(len(images.classes))]), dim=-1)
    correct = (clean @ texts.T).argmax(1) == labels
    row = {"model": spec, "ca": round(100 * correct.float().mean().item(), 2),
           "logit_scale": round(clip.logit_scale.item(), 1),
           "zs_margin": round(margins(clean[correct], labels[correct], texts).median().item(), 4),
           "image_margin": round(margins(clean[correct], labels[correct], centroids).median().item(), 4),
           "cos_own_text": round((clean * texts[labels]).sum(1).median().item(), 4),
           "direction_alignment": round(alignment(texts, centroids), 4)}
    record = clip.config.get("attack")
    if record is not None:
        trigger = load_trigger(spec, record)
        target = images.classes.index(record["target"])
        trigger.generator.manual_seed(seed)  # as the evaluation seeds it: zs ASR is its ASR
        keep = torch.nonzero(labels != target).flatten()
        triggered = image_features(clip, images, lambda x, _: trigger(x), indices=keep)
        y = labels[keep]

        def gap(features, anchors):  # cos to the target's anchor minus cos to the own class's
            scores = features @ anchors.T
            return scores[:, target] - scores.gather(1, y[:, None]).squeeze(1)

        for name, anchors in (("zs", texts), ("image", centroids)):
            before = gap(clean[keep], anchors)
            row[f"{name}_gap"] = round(-before.median().item(), 4)
            row[f"{name}_shift"] = round((gap(triggered, anchors) - before).median().item(), 4)
        row.update(
            zs_asr=round(100 * ((triggered @ texts.T).argmax(1) == target).float().mean().item(), 2),
            centroid_asr=round(100 * ((triggered @ centroids.T).argmax(1) == target).float().mean().item(), 2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seed", type=int, default=0, help="random trigger placement (as `clipguard evaluate --seed`)")
    args = parser.parse_args()
    for spec in args.models:
        print(json.dumps(geometry(spec, args.seed)), flush=True)


if __name__ == "__main__":
    main()
