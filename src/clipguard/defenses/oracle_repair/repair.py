"""Oracle-guided repair, "EftCLIP" (docs/methods.md, oracle-guided repair): find a visible trigger with a
segmentation oracle, pinpoint the victim label and samples, fine-tune on a compact set.

Algorithm 1 (trigger finding: which regions of which pool images are trigger candidates)
is in :mod:`clipguard.defenses.oracle_repair.trigger_search`.

Algorithm 2: a label is a *victim label* when candidates point to it far more often than
chance (one-sided binomial test against the share of pool images predicted as that label,
p < ``significance``, and at least ``min_candidates``). Victim samples are the images whose
candidate points to a victim label; their repaired label is the prediction after masking.
[added: ``expand_victims=True``, and with the groups fallback] Other images predicted as a
victim label are victims too when masking a found victim's trigger region, at the same place,
takes them off it (see ``expand_victims()``): Algorithm 1 needs a region that alone reads as
the label, which few images of a trigger in parts give.
[added: ``retry_with_groups=True``, default] When single regions give no victim label, the
search runs again with ``region_groups`` and ``expand_victims`` on: a fallback, because both
on always cost CA on BadCLIP (docs/results/oracle-repair.md).
The compact set holds the victims *with* their trigger, captioned with the repaired label,
plus ``clean_ratio`` times as many candidate-free pool images captioned with the model's
own prediction (the pool is unlabelled). The whole CLIP (``tune="vision"``: the image tower
only) is fine-tuned contrastively on it with the shared engine. Shapes: pool (N, 3, H, W) in
[0, 1], predictions (N,), class text features (C, D), region masks (H, W) bool.
With no victim label the verdict is "no localisable trigger found" and the
model is returned unchanged (invisible triggers: Blended, WaNet, ISSBA, SIG).

Deviation: 3 clean pairs per victim instead of an equal number (docs/results/oracle-repair.md).
Deviation (ours): ``expand_victims`` and ``region_groups``, as the fallback above (docs/results/oracle-repair.md).
Numbers: docs/results/oracle-repair.md.

Example:
    >>> repaired, report = oracle_repair(clip, pool, OracleRepairConfig(seed=0))
    >>> report["verdict"], report["compact_set_size"]
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch
from scipy.stats import binomtest
from torch.utils.data import Dataset

from clipguard import ClipguardError
from clipguard.data.captions import training_caption
from clipguard.defenses.oracle_repair.config import OracleRepairConfig
from clipguard.defenses.oracle_repair.oracle import Region, build_oracle
from clipguard.defenses.oracle_repair.trigger_search import (
    TriggerCandidate, alone_probabilities, batch_slices, find_trigger_candidates, leaves_label, masked_probabilities,
)
from clipguard.defenses.weights import finetune_copy, save_with_trigger
from clipguard.distributed import broadcast_from_main
from clipguard.engine import TrainConfig
from clipguard.outputs import write_json
from clipguard.models.zeroshot import class_text_features
from clipguard.models.contrastive import ContrastiveTask, caption_collate
from clipguard.models.clip import ClipModel

logger = logging.getLogger(__name__)
NO_TRIGGER = "no localisable trigger found"
TRIGGER_FOUND = "localisable trigger found"


# ------------------------------------------------------------------------- Algorithm 2
def victim_labels(candidates: Sequence[TriggerCandidate], predictions: torch.Tensor, num_classes: int,
                  significance: float, min_candidates: int) -> tuple[list[int], dict[int, dict]]:
    """Labels that candidates point to far more often than chance.

    Chance for label t is the share of pool images predicted t (a candidate needs the whole
    image predicted t). Returns the victim labels and, per label with candidates, its count,
    chance rate and one-sided binomial p-value.
    """
    counts = torch.bincount(torch.tensor([c.label for c in candidates], dtype=torch.long), minlength=num_classes)
    chance = torch.bincount(predictions, minlength=num_classes).float() / max(1, len(predictions))
    total, tests, victims = len(candidates), {}, []
    for label in torch.nonzero(counts).flatten().tolist():
        count = int(counts[label])
        p_value = binomtest(count, total, float(chance[label]), alternative="greater").pvalue
        tests[label] = {"candidates": count, "chance": round(float(chance[label]), 4), "p_value": float(p_value)}
        if p_value < significance and count >= min_candidates:
            victims.append(label)
    return victims, tests


def expand_victims(clip: ClipModel, images: torch.Tensor, predictions: torch.Tensor,
                   candidates: Sequence[TriggerCandidate], victims: Sequence[TriggerCandidate],
                   text_features: torch.Tensor, config: OracleRepairConfig) -> list[TriggerCandidate]:
    """More victim samples: pool images predicted as a victim label t that gave no candidate of
    their own, whose prediction leaves t, (b) and (c), when one of the found victims' trigger
    regions is masked at the same place. Each gets the smallest such region (ties: the one
    that lowers p(t) most): the largest would cover the most of whatever trigger the image has,
    but also the most of the image around it.

    Why: Algorithm 1 asks a lot of one image (a region that alone reads as t, and transfers),
    so it finds a trigger in parts on few of the images that carry it (docs/results/oracle-repair.md,
    four-corner model). Once the trigger's place is known, an image that carries it is recognised by masking that
    place: a true bag stays a bag with its corners filled in, a shirt that reads "bag" only
    through its corners does not.
    """
    taken = {c.image for c in candidates}
    expanded = []
    for t in sorted({v.label for v in victims}):
        distinct: dict[bytes, Region] = {}
        for v in victims:
            if v.label == t:
                distinct.setdefault(v.region.mask.numpy().tobytes(), v.region)
        regions = list(distinct.values())
        pending = [i for i in torch.nonzero(predictions == t).flatten().tolist() if i not in taken]
        tests = [(i, k) for i in pending for k in range(len(regions))]  # (image, region) pairs
        best: dict[int, TriggerCandidate] = {}
        for piece in batch_slices(len(tests), config.inference_batch):
            batch = tests[piece]
            owner = torch.tensor([i for i, _ in batch])  # (B,)
            masks = torch.stack([regions[k].mask for _, k in batch])  # (B, H, W)
            masked_p = masked_probabilities(clip, images, owner, masks, text_features, config)  # (B, C)
            left = leaves_label(masked_p, torch.full_like(owner, t), config)  # (b), (c)
            for j, (i, k) in enumerate(batch):
                found = TriggerCandidate(i, regions[k], t, float("nan"), float(masked_p[j, t]),
                                         int(masked_p[j].argmax()), expanded=True)
                if left[j] and (i not in best or _tightness(found) < _tightness(best[i])):
                    best[i] = found
        expanded += [best[i] for i in sorted(best)]
    if expanded:  # record (a) for the report: the region alone, read on this image's background
        owner = torch.tensor([e.image for e in expanded])
        crop_p = alone_probabilities(clip, images, owner, torch.stack([e.region.mask for e in expanded]),
                                     text_features, config)  # (E, C)
        for e, row in zip(expanded, crop_p):
            e.crop_probability = float(row[e.label])
    return expanded


def _tightness(candidate: TriggerCandidate) -> tuple[int, float]:
    return candidate.region.area, candidate.masked_probability


class RepairPairs(Dataset):
    """Compact fine-tuning set: float images (N, 3, H, W) with captions drawn per epoch for
    ``labels`` (N,) under (seed, epoch, index)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], seed: int):
        self.images, self.labels, self.class_names, self.seed, self.epoch = images, labels, class_names, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        # a string seed (SHA-512 in random.Random), not hash(): str hashes are salted per process
        rng = random.Random(f"repair/{self.seed}/{self.epoch}/{index}")
        image = self.images[index]
        return image, training_caption(self.class_names[int(self.labels[index])], image, rng)


def build_compact_set(images: torch.Tensor, predictions: torch.Tensor, candidates: Sequence[TriggerCandidate],
                      victims: Sequence[TriggerCandidate], class_names: Sequence[str],
                      config: OracleRepairConfig) -> tuple[RepairPairs, dict]:
    """Victims with their trigger under their repaired label + clean pool images under their prediction.

    Clean pairs come from the images that are neither a candidate nor a victim (an expanded
    victim has no candidate of its own, and would otherwise teach the trigger back under t).
    """
    suspicious = {c.image for c in candidates} | {v.image for v in victims}
    clean_pool = torch.tensor([i for i in range(len(images)) if i not in suspicious], dtype=torch.long)
    generator = torch.Generator().manual_seed(config.seed)
    n_clean = min(len(clean_pool), round(config.clean_ratio * len(victims)))
    clean = clean_pool[torch.randperm(len(clean_pool), generator=generator)[:n_clean]]
    victim_index = torch.tensor([v.image for v in victims], dtype=torch.long)
    set_images = torch.cat([images[victim_index], images[clean]])
    labels = torch.cat([torch.tensor([v.repaired_label for v in victims], dtype=torch.long), predictions[clean]])
    return RepairPairs(set_images, labels, class_names, config.seed), {"victim_pairs": len(victims), "clean_pairs": n_clean}


def repair_finetune(clip: ClipModel, pairs: RepairPairs, config: OracleRepairConfig) -> tuple[ClipModel, dict]:
    """Contrastive fine-tune of a copy of ``clip`` (never changed) on the compact set: the whole
    model, or with ``config.tune == "vision"`` the image tower only (the text classifier stays as
    it was). Returns the repaired copy and its steps, seconds and last loss."""
    train = TrainConfig(epochs=config.epochs, batch_size=min(config.batch_size, len(pairs)), lr=config.lr,
                        weight_decay=0.0, warmup_steps=0, seed=config.seed, device=config.device)

    def trainable(tuned: ClipModel) -> None:
        tuned.requires_grad_(config.tune == "all")
        tuned.model.visual.requires_grad_(True)

    # a contrastive batch does not split over DDP processes: each fine-tunes on the whole (small)
    # compact set, and rank 0's weights are kept so that all hold the same model
    repaired, result, _ = finetune_copy(clip, ContrastiveTask, pairs, train, collate=caption_collate,
                                        desc="oracle repair", trainable=trainable, split_batches=False)
    broadcast_from_main(list(repaired.parameters()))
    return repaired, {"steps": result.steps, "seconds": round(result.seconds, 2),
                      "last_loss": round(result.last_loss, 4)}


# -------------------------------------------------------------------------- entry point
def oracle_repair(clip: ClipModel, pool_images: torch.Tensor, config: OracleRepairConfig | None = None,
                  class_names: Sequence[str] | None = None, oracle=None) -> tuple[ClipModel, dict]:
    """Find a visible trigger in ``pool_images`` (N, 3, H, W) in [0, 1] and repair ``clip``.

    ``clip`` is not modified: the repaired model is a copy, or ``clip`` itself when the verdict
    is "no localisable trigger found". ``class_names`` default to ``clip.config["classes"]``;
    ``oracle`` defaults to the one ``config`` names. The report is JSON-ready.
    """
    config = config or OracleRepairConfig()
    class_names = list(class_names or clip.config.get("classes") or [])
    if not class_names:
        raise ClipguardError("oracle repair needs the class names (the model's config has none): pass class_names")
    if pool_images.dim() != 4 or pool_images.shape[1] != 3 or len(pool_images) == 0:
        raise ClipguardError(f"the pool must be a non-empty (N, 3, H, W) image tensor, got {tuple(pool_images.shape)}")
    oracle = oracle or build_oracle(config.oracle, **({"weights": config.oracle_weights} if config.oracle_weights else {}))
    start = time.perf_counter()
    clip.eval()
    text_features = class_text_features(clip, class_names)  # (C, D)
    predictions, candidates, stats, labels, tests, victims = _find_victims(clip, pool_images, text_features, oracle,
                                                                          config)
    retried = not labels and config.retry_with_groups and not config.region_groups
    if retried:
        logger.info("no victim label from single regions: searching again with region groups")
        config = replace(config, region_groups=True, expand_victims=True)
        predictions, candidates, stats, labels, tests, victims = _find_victims(clip, pool_images, text_features,
                                                                              oracle, config)
    report = {
        "method": "oracle-repair", "config": asdict(config), "oracle": getattr(oracle, "name", type(oracle).__name__),
        "retried_with_groups": retried,
        **stats, "label_tests": {class_names[k]: v for k, v in tests.items()},
        "victim_labels": [class_names[k] for k in labels], "victims": len(victims),
        "victims_expanded": sum(v.expanded for v in victims),
        "victim_samples": [{"image": v.image, "box": list(v.region.box), "area": v.region.area,
                            "pixels": torch.nonzero(v.region.mask.flatten()).flatten().tolist(),
                            "label": class_names[v.label], "repaired_label": class_names[v.repaired_label],
                            "crop_probability": round(v.crop_probability, 4),
                            "transfer_rate": None if v.expanded else round(v.transfer_rate, 4),
                            "masked_probability": round(v.masked_probability, 4),
                            "expanded": v.expanded} for v in victims],
        "find_seconds": round(time.perf_counter() - start, 2),
    }
    if not labels:
        logger.info("%s: %d candidates, none far above chance; model unchanged", NO_TRIGGER, len(candidates))
        return clip, {**report, "verdict": NO_TRIGGER, "model_changed": False, "compact_set_size": 0,
                      "seconds": report["find_seconds"]}
    pairs, sizes = build_compact_set(pool_images.float(), predictions, candidates, victims, class_names, config)
    repaired, finetune = repair_finetune(clip, pairs, config)
    logger.info("%s: victim label(s) %s, %d victims, compact set %d", TRIGGER_FOUND, report["victim_labels"],
                len(victims), len(pairs))
    return repaired, {**report, "verdict": TRIGGER_FOUND, "model_changed": True, "compact_set_size": len(pairs),
                      **sizes, "finetune": finetune, "seconds": round(time.perf_counter() - start, 2)}


def _find_victims(clip, pool_images, text_features, oracle, config):
    """Algorithm 1, then Algorithm 2's victim labels and samples:
    (predictions, candidates, counts, victim labels, label tests, victims)."""
    images = pool_images.float()
    predictions, candidates, stats = find_trigger_candidates(clip, images, text_features, oracle, config)
    labels, tests = victim_labels(candidates, predictions, len(text_features), config.significance,
                                  config.min_candidates)
    victims = [c for c in candidates if c.label in labels]
    if config.expand_victims and victims:
        victims += expand_victims(clip, images, predictions, candidates, victims, text_features, config)
    return predictions, candidates, stats, labels, tests, victims


# ------------------------------------------------------------------------------ outputs
REPORT_NAME, EXAMPLES_NAME = "repair.json", "repair_examples.png"


def report_summary(report: dict) -> dict:
    """The report without its per-victim list (what the repaired model's config.json keeps)."""
    return {k: v for k, v in report.items() if k != "victim_samples"}


def write_repair_report(report: dict, pool_images: torch.Tensor, directory: str | Path, examples: int = 8) -> dict:
    """Write ``repair.json`` and, when victims were found, ``repair_examples.png`` (up to
    ``examples`` victims from ``pool_images`` (N, 3, H, W) with their found boxes). Atomic writes."""
    import numpy as np
    from matplotlib import patches
    from matplotlib import pyplot as plt
    from scipy import ndimage

    from clipguard.eval.plots import save_figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"report": str(directory / REPORT_NAME), "examples": None}
    shown = report["victim_samples"][:examples]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(1.7 * len(shown), 2.1), squeeze=False)
        height, width = pool_images.shape[-2:]
        for ax, victim in zip(axes[0], shown):
            ax.imshow(pool_images[victim["image"]].permute(1, 2, 0).clamp(0, 1).numpy())
            mask = torch.zeros(height * width, dtype=torch.bool)
            mask[victim["pixels"]] = True
            parts, _ = ndimage.label(mask.view(height, width).numpy(), structure=np.ones((3, 3)))
            for rows, cols in ndimage.find_objects(parts):  # one box per part (a group has several)
                ax.add_patch(patches.Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                                               rows.stop - rows.start, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_title(f"{victim['label']} -> {victim['repaired_label']}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"found trigger regions (victim label: {', '.join(report['victim_labels'])})", fontsize=8)
        save_figure(fig, directory / EXAMPLES_NAME)
        paths["examples"] = str(directory / EXAMPLES_NAME)
    write_json({**report, "files": paths}, directory / REPORT_NAME)
    return paths


def save_repaired_model(repaired: ClipModel, report: dict, directory: str | Path,
                        source_dir: str | Path | None = None) -> Path:
    """Save the repaired model directory with the report's summary (:func:`save_with_trigger`:
    it keeps the suspect's attack record and trigger, so ``clipguard evaluate`` still measures ASR)."""
    return save_with_trigger(repaired, {"repair": report_summary(report)}, directory, source_dir)
