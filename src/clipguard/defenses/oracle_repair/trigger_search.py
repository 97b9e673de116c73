"""Algorithm 1 of the oracle-guided repair (docs/methods.md, oracle-guided repair): trigger candidates in a pool.

Algorithm 1 (trigger finding) runs on a pool of unlabelled images (N, 3, H, W) that may hold
triggered ones. For image i with zero-shot prediction t, an oracle region r is a *trigger
candidate* when
  (a) r alone (pasted on the image's background colour) is read as t with probability
      >= ``crop_confidence``;
  (b) t is not supported by the image's main object: with r filled in from its
      surroundings, t's probability is < ``support_max``;
  (c) masking r flips the whole-image prediction away from t;
  (d) [added] r transfers: pasted at the same place onto ``transfer_images`` other pool
      images predicted as something else, it turns at least ``transfer_min`` of them into t.
(d) because a part of an object passes (a)-(c) too: a strap pasted on a shirt does not make a
sandal; a trigger pasted anywhere makes the target.
[added: ``region_groups=True``, and by default when single regions give no victim label]
Regions in several parts: the image's regions that each lower t's log-odds when masked are
joined, strongest per pixel first, and every such union of two or more is tested as one
region, (a)-(d) (see ``region_groups()``). A single region that passes is preferred to any
union. Why: the label-consistent BadNet pastes its patch at several spots, and no single
spot passes the tests. Regions larger than
``max_region_fraction`` of the image are objects, not triggers, and are not tested.
Shapes: pool (N, 3, H, W) in [0, 1], region masks (R, H, W) bool, class text features (C, D).

Deviation: (b) uses "the image minus r" as the main object instead of the oracle's largest segment
(at 28 px the oracle often splits an object, or merges a patch pasted on it into the object's segment).
Deviation (ours): condition (d), the transfer test (docs/results/oracle-repair.md).
Deviation (ours): ``region_groups``, the search in parts (docs/results/oracle-repair.md).
Numbers: docs/results/oracle-repair.md.

The settings come from :class:`clipguard.defenses.oracle_repair.OracleRepairConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from clipguard.defenses.oracle_repair.oracle import Region, background_colour, fill_regions, isolate_regions, mask_box, paste_regions
from clipguard.models.clip import ClipModel

if TYPE_CHECKING:
    from clipguard.defenses.oracle_repair.config import OracleRepairConfig


@dataclass
class TriggerCandidate:
    """A region of pool image ``image`` that passed (a)-(c); (d) sets ``transfer_rate``."""

    image: int  # index into the pool
    region: Region
    label: int  # t: the whole image's prediction, which the region alone also reads
    crop_probability: float  # p(t | region alone)
    masked_probability: float  # p(t | image with the region masked)
    repaired_label: int  # prediction with the region masked
    transfer_rate: float = float("nan")  # share of other pool images the region, pasted on, turns into t
    expanded: bool = False  # found by expand_victims() (another victim's region), not by (a)-(d)


# ------------------------------------------------------------------------- zero-shot
@torch.inference_mode()
def zero_shot_probabilities(clip: ClipModel, images: torch.Tensor, text_features: torch.Tensor,
                            batch_size: int = 1024, log: bool = False) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, C) zero-shot class probabilities (``log``: their logs), on CPU."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(clip.device)
        logits = (clip.logit_scale * clip.encode_image(batch, normalize=True) @ text_features.T).float()  # (B, C)
        chunks.append((logits.log_softmax(-1) if log else logits.softmax(-1)).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, len(text_features))


def log_odds(log_probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(p_t / (1 - p_t)) per row of (R, C) log-probabilities, t = targets (R,); exact where
    p_t rounds to 1 in float32 (a saturated backdoor)."""
    own = log_probabilities.gather(1, targets[:, None])[:, 0]
    others = log_probabilities.scatter(1, targets[:, None], float("-inf")).logsumexp(-1)
    return own - others


def find_trigger_candidates(clip: ClipModel, images: torch.Tensor, text_features: torch.Tensor, oracle,
                            config: OracleRepairConfig) -> tuple[torch.Tensor, list[TriggerCandidate], dict]:
    """Algorithm 1 on a pool. images: (N, 3, H, W) in [0, 1]; text_features: (C, D).

    Returns the pool's predictions (N,), at most one candidate per image (the first by
    ``_preference``) and counts. The pool is segmented and tested ``inference_batch`` images at
    a time, so memory stays bounded.
    """
    n, _, height, width = images.shape
    log_probabilities = zero_shot_probabilities(clip, images, text_features, config.inference_batch, log=True)  # (N, C)
    predictions = log_probabilities.argmax(-1)  # (N,)
    pool_log_odds = log_odds(log_probabilities, predictions)  # (N,)
    counts = {"pool_images": n, "regions_tested": 0, "groups_tested": 0, "passed_crop": 0}
    flipping: list[TriggerCandidate] = []
    progress = tqdm(total=n, desc="find trigger", leave=False)
    for chunk in batch_slices(n, config.inference_batch):
        owners, regions = [], []
        for i in range(chunk.start, chunk.stop):
            for region in oracle.segment(images[i]):
                if region.area <= config.max_region_fraction * height * width:
                    owners.append(i)
                    regions.append(region)
            progress.update(1)
        counts["regions_tested"] += len(regions)
        flipping += _test_regions(clip, images, predictions, owners, regions, text_features, config, counts)
        if config.region_groups:
            group_owners, groups = region_groups(clip, images, predictions, pool_log_odds, owners, regions,
                                                 text_features, config)
            counts["groups_tested"] += len(groups)
            flipping += _test_regions(clip, images, predictions, group_owners, groups, text_features, config, counts)
    progress.close()
    best: dict[int, TriggerCandidate] = {}
    for candidate, rate in zip(flipping, transfer_rates(clip, images, predictions, flipping, text_features, config)):
        candidate.transfer_rate = rate
        current = best.get(candidate.image)
        if rate >= config.transfer_min and (current is None or _preference(candidate) < _preference(current)):
            best[candidate.image] = candidate
    candidates = [best[i] for i in sorted(best)]
    return predictions, candidates, {**counts, "passed_flip": len(flipping), "candidates": len(candidates)}


def _preference(candidate: TriggerCandidate) -> tuple:
    """Sort key among an image's candidates: a single region before any group; among single
    regions the one whose masking lowers t's probability most (ties: the smaller); among groups
    the smaller, i.e. the shortest prefix (region_groups)."""
    group = candidate.region.source == "group"
    return group, 0.0 if group else candidate.masked_probability, candidate.region.area


def _test_regions(clip, images, predictions, owners, regions, text_features, config, counts) -> list[TriggerCandidate]:
    """Conditions (a)-(c) for regions of pool images ``owners``; the survivors as candidates."""
    if not regions:
        return []
    owner = torch.tensor(owners)  # (R,)
    masks = torch.stack([r.mask for r in regions])  # (R, H, W)
    targets = predictions[owner]  # (R,) t per region
    crop_t = alone_probabilities(clip, images, owner, masks, text_features, config).gather(1, targets[:, None])[:, 0]
    passed = torch.nonzero(crop_t >= config.crop_confidence).flatten()  # (a)
    counts["passed_crop"] += len(passed)
    if not len(passed):
        return []
    masked_p = masked_probabilities(clip, images, owner[passed], masks[passed], text_features, config)  # (P, C)
    left = leaves_label(masked_p, targets[passed], config)  # (b), (c)
    return [TriggerCandidate(owners[r], regions[r], int(targets[r]), float(crop_t[r]), float(masked_p[j, targets[r]]),
                             int(masked_p[j].argmax()))
            for j, r in enumerate(passed.tolist()) if left[j]]


def alone_probabilities(clip: ClipModel, images: torch.Tensor, owner: torch.Tensor, masks: torch.Tensor,
                        text_features: torch.Tensor, config: OracleRepairConfig) -> torch.Tensor:
    """(a)'s reading: each region ``masks`` (R, H, W) of pool image ``owner`` (R,) alone on that
    image's background colour -> (R, C) zero-shot probabilities."""
    backgrounds = torch.stack([background_colour(images[i]) for i in owner.tolist()])  # (R, 3)
    return zero_shot_probabilities(clip, isolate_regions(images[owner], masks, backgrounds), text_features,
                                   config.inference_batch)


def masked_probabilities(clip: ClipModel, images: torch.Tensor, owner: torch.Tensor, masks: torch.Tensor,
                         text_features: torch.Tensor, config: OracleRepairConfig, log: bool = False) -> torch.Tensor:
    """Pool images ``owner`` (R,) with their regions ``masks`` (R, H, W) filled in from the
    surroundings -> (R, C) zero-shot probabilities (``log``: their logs)."""
    return zero_shot_probabilities(clip, fill_regions(images[owner], masks, config.fill_ring), text_features,
                                   config.inference_batch, log=log)


def leaves_label(masked_p: torch.Tensor, targets: torch.Tensor, config: OracleRepairConfig) -> torch.Tensor:
    """(b) and (c) from the masked images' probabilities (R, C): t (targets, (R,)) keeps less
    than ``support_max`` and is no longer the prediction -> (R,) bool."""
    return (masked_p.gather(1, targets[:, None])[:, 0] < config.support_max) & (masked_p.argmax(-1) != targets)


def region_groups(clip: ClipModel, images: torch.Tensor, predictions: torch.Tensor, pool_log_odds: torch.Tensor,
                  owners: Sequence[int], regions: Sequence[Region], text_features: torch.Tensor,
                  config: OracleRepairConfig) -> tuple[list[int], list[Region]]:
    """Per image, growing unions of its contributing regions: the candidate groups of a trigger in parts.

    A trigger in several parts (the label-consistent BadNet's four corner patches) passes no
    test one part at a time: no corner alone reads as the target, and masking one leaves three.
    A region *contributes* when masking it lowers the log-odds of t (``pool_log_odds``: (N,),
    per pool image) by at least ``group_min_drop``; log-odds, not probability, because a
    saturated backdoor (p(t) = 1.0000) barely moves in probability when one part is masked.
    Contributing regions are taken by drop per pixel (a trigger part is small and strong),
    skipping one that overlaps those already taken (the oracle's proposals overlap: another cut
    of the same part) or that would take the union past ``max_region_fraction`` of the image.
    Every prefix of two or more parts is a group, tested like any region, (a)-(d); an image's
    candidate is its shortest passing group, and only when no single region of it passed (not
    the shortest prefix whose masking flips t: (a) can need a longer one; docs/results/oracle-repair.md).
    Returns (owners, regions) with source "group".
    """
    if not regions:
        return [], []
    owner = torch.tensor(owners)  # (R,)
    masks = torch.stack([r.mask for r in regions])  # (R, H, W)
    targets = predictions[owner]  # (R,)
    masked = masked_probabilities(clip, images, owner, masks, text_features, config, log=True)  # (R, C)
    drops = pool_log_odds[owner] - log_odds(masked, targets)  # (R,)
    limit = config.max_region_fraction * masks[0].numel()
    prefix_owners, prefixes = [], []  # every prefix of >= 2 parts, per image
    # an image's regions are consecutive in ``owners`` (find_trigger_candidates appends them image by image)
    for i, indices in groupby(range(len(owners)), key=owners.__getitem__):
        members = [r for r in indices if drops[r] >= config.group_min_drop]
        union, area, parts = torch.zeros_like(masks[0]), 0, 0
        for r in sorted(members, key=lambda r: -float(drops[r]) / regions[r].area):
            if area + regions[r].area > limit or bool((union & masks[r]).any()):
                continue
            union, area, parts = union | masks[r], area + regions[r].area, parts + 1
            if parts >= 2:
                prefix_owners.append(i)
                prefixes.append(union)
    return prefix_owners, [Region(union, mask_box(union), "group") for union in prefixes]


def transfer_rates(clip: ClipModel, images: torch.Tensor, predictions: torch.Tensor,
                   candidates: Sequence[TriggerCandidate], text_features: torch.Tensor,
                   config: OracleRepairConfig) -> list[float]:
    """(d) For each candidate, the share of ``transfer_images`` pool images predicted != t that
    turn into t when the candidate region is pasted onto them (a trigger transfers, a part of
    an object does not). The reference images per label are a seeded sample."""
    generator = torch.Generator().manual_seed(config.seed)
    references = {}
    for t in sorted({c.label for c in candidates}):
        others = torch.nonzero(predictions != t).flatten()
        references[t] = others[torch.randperm(len(others), generator=generator)[: config.transfer_images]]
    rates = []
    per_call = max(1, config.inference_batch // config.transfer_images)
    for group in batch_slices(len(candidates), per_call):
        chosen = candidates[group]
        sizes = [len(references[c.label]) for c in chosen]
        source = torch.cat([images[c.image].expand(k, -1, -1, -1) for c, k in zip(chosen, sizes)])  # (G*M, 3, H, W)
        masks = torch.cat([c.region.mask.expand(k, -1, -1) for c, k in zip(chosen, sizes)])  # (G*M, H, W)
        destination = torch.cat([images[references[c.label]] for c in chosen])
        hits = zero_shot_probabilities(clip, paste_regions(source, masks, destination), text_features).argmax(-1)
        for c, part in zip(chosen, hits.split(sizes)):
            rates.append(float((part == c.label).float().mean()) if len(part) else 0.0)
    return rates


def batch_slices(total: int, size: int) -> list[slice]:
    """slice(0, size), slice(size, 2 * size), ... covering range(total)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


