"""Per-target trigger inversion, all candidate targets in one batch (Neural Cleanse's reverse step).

Neural Cleanse (Wang et al., S&P 2019) asks, for every class t, how small a trigger can be that
sends images of all other classes to t; a backdoor's target needs a much smaller one than the
others. Here, for K candidate targets at once, a mask m_k (H, W) and pattern p_k (3, H, W) (both
sigmoids of free logits, x' = (1 - m_k) * x + m_k * p_k as in :mod:`~clipguard.detection.inversion`)
minimise

    L_k = CE(zero-shot logits of triggered shots of classes != t_k, t_k) + lambda_k * mean(m_k)

and lambda_k rises while the trigger works (its success, the share of those shots read as t_k,
at least ``success``) and falls while it does not. The size of target k is the smallest mask
area at which its trigger worked; a target never reached keeps its last area. Also recorded per
target: the kept trigger's success and the coherence of the triggered features (their mean
pairwise cosine over shots of other classes: a backdoor sends them to one point, DECREE's
observation). Shapes: shots
(N, 3, H, W); triggered batch (K * B, 3, H, W); class features (C, D).

Deviation: K targets in one batch of K * B images (NC inverts each class alone; 1,000 classes
would be 1,000 inversions); ``batch_size`` shots per step, not all.
Deviation: ``steps`` (150) Adam steps with lambda multiplied / divided by ``lambda_factor`` every
step, instead of NC's patience schedule over thousands of steps.
Deviation: the classifier is CLIP's zero-shot head on the shots' class names.

Example:
    >>> result = invert_targets(clip, shots, ["bag", "sandal", "shirt"], TargetedConfig(steps=50))
    >>> result.sizes  # smallest working mask area per target, in the order given
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet
from clipguard.detection.inversion import mean_pairwise_cosine
from clipguard.device import resolve_device
from clipguard.models.clip import ClipModel
from clipguard.models.zeroshot import class_text_features
from clipguard.registry import RangeChecked


@dataclass
class TargetedConfig(RangeChecked):
    steps: int = 150  # Adam steps, every candidate target in each
    batch_size: int = 32  # shots per step (each seen with every candidate's trigger); capped at the shots
    lr: float = 0.1  # Adam on the mask and pattern logits
    success: float = 0.9  # share of other-class shots read as the target for a trigger to count as working
    start_area: float = 0.1  # the initial mask area
    lambda_init: float = 0.1  # initial weight of the mask-area term
    lambda_factor: float = 1.2  # lambda is multiplied (trigger works) or divided (it does not) each step
    seed: int = 0  # seeds the pattern initialisation and the batches
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        for name, low, high in (("steps", 1, 10**6), ("batch_size", 1, 10**6), ("lr", 1e-8, 100.0),
                                ("success", 0.01, 1.0), ("start_area", 1e-4, 0.99), ("lambda_init", 0.0, 1e6),
                                ("lambda_factor", 1.0, 10.0)):
            self._check_range(name, low, high)


@dataclass
class TargetedResult:
    """Per candidate target (in the order given): the smallest working trigger."""

    targets: list[str]  # candidate target names
    sizes: list[float]  # smallest mask area at which the trigger worked (last area if it never did)
    reached: list[bool]  # whether the trigger ever worked
    success: list[float]  # the kept trigger's success on all shots of other classes
    coherence: list[float]  # mean pairwise cosine of those shots' features under the kept trigger
    masks: torch.Tensor  # (K, H, W) the kept masks
    patterns: torch.Tensor  # (K, 3, H, W) the kept patterns
    seconds: float = 0.0


def _success(predictions: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(K,) share of rows with labels != target predicted as the target. predictions (K, B), labels (B,), targets (K,)."""
    others = labels[None, :] != targets[:, None]  # (K, B)
    hits = (predictions == targets[:, None]) & others
    return hits.sum(1).float() / others.sum(1).clamp(min=1).float()


def invert_targets(clip: ClipModel, shots: ImageSet, targets: Sequence[str], config: TargetedConfig | None = None,
                   class_features: torch.Tensor | None = None) -> TargetedResult:
    """The smallest working trigger towards each of ``targets`` (names in ``shots.classes``), all in
    one batch. ``class_features`` (C, D): the zero-shot head (default: template features of the
    shots' classes). ``clip``'s weights are not changed."""
    config = config or TargetedConfig()
    start = time.perf_counter()
    unknown = [t for t in targets if t not in shots.classes]
    if unknown:
        raise ClipguardError(f"targeted inversion: {unknown} not among the shots' classes {list(shots.classes)}")
    device = resolve_device(config.device)
    clip.to(device).requires_grad_(False)  # as the inversion's engine does
    generator = torch.Generator().manual_seed(config.seed)
    images = shots.float_images().to(device)  # (N, 3, H, W)
    labels = shots.labels.to(device)
    k, size = len(targets), images.shape[-1]
    target_index = torch.tensor([shots.classes.index(t) for t in targets], device=device)  # (K,)
    texts = (class_text_features(clip, shots.classes) if class_features is None else class_features).to(device)
    texts = texts.clone()  # out of inference mode
    mask_logits = torch.full((k, size, size), float(torch.logit(torch.tensor(config.start_area))), device=device)
    pattern_logits = torch.randn(k, 3, size, size, generator=generator).to(device)
    mask_logits.requires_grad_(True)
    pattern_logits.requires_grad_(True)
    optimiser = torch.optim.Adam([mask_logits, pattern_logits], lr=config.lr)
    weight = torch.full((k,), config.lambda_init, device=device)
    best_area = torch.full((k,), float("inf"))
    best_mask = torch.sigmoid(mask_logits.detach()).cpu()
    best_pattern = torch.sigmoid(pattern_logits.detach()).cpu()
    batch = min(config.batch_size, len(images))
    order = torch.randperm(len(images), generator=generator)
    position = 0
    scale = clip.logit_scale.detach()
    for _ in tqdm(range(config.steps), desc=f"targeted inversion ({k} targets)", leave=False):
        if position + batch > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        pick = order[position : position + batch].to(device)
        position += batch
        x, y = images[pick], labels[pick]  # (B, 3, H, W), (B,)
        mask, pattern = torch.sigmoid(mask_logits), torch.sigmoid(pattern_logits)  # (K, H, W), (K, 3, H, W)
        triggered = (1 - mask[:, None, None]) * x[None] + mask[:, None, None] * pattern[:, None]  # (K, B, 3, H, W)
        features = clip.encode_image(triggered.flatten(0, 1), normalize=True)  # (K * B, D)
        logits = (scale * features @ texts.T).view(k, batch, -1)  # (K, B, C)
        others = (y[None, :] != target_index[:, None]).float()  # (K, B)
        ce = F.cross_entropy(logits.flatten(0, 1), target_index.repeat_interleave(batch), reduction="none").view(k, batch)
        per_target = (ce * others).sum(1) / others.sum(1).clamp(min=1)  # (K,)
        area = mask.mean((1, 2))  # (K,)
        loss = (per_target + weight * area).sum()
        optimiser.zero_grad()
        loss.backward()
        with torch.no_grad():
            works = _success(logits.argmax(-1), y, target_index) >= config.success  # (K,)
            smaller = works.cpu() & (area.cpu() < best_area)
            if smaller.any():
                best_area = torch.where(smaller, area.cpu(), best_area)
                best_mask[smaller], best_pattern[smaller] = mask[smaller.to(device)].cpu(), pattern[smaller.to(device)].cpu()
            weight = torch.where(works, weight * config.lambda_factor, weight / config.lambda_factor).clamp(1e-4, 1e4)
        optimiser.step()
    reached = torch.isfinite(best_area)
    with torch.no_grad():
        last_mask, last_pattern = torch.sigmoid(mask_logits).cpu(), torch.sigmoid(pattern_logits).cpu()
        best_mask[~reached], best_pattern[~reached] = last_mask[~reached], last_pattern[~reached]
        sizes = torch.where(reached, best_area, last_mask.mean((1, 2)))
        success, coherence = [], []
        for j in range(k):  # the kept triggers on all shots
            triggered = (1 - best_mask[j]) * images.cpu() + best_mask[j] * best_pattern[j]
            features = clip.encode_image(triggered.to(device), normalize=True)  # (N, D)
            predictions = (features @ texts.T).argmax(-1)
            success.append(float(_success(predictions[None], labels, target_index[j : j + 1])[0]))
            others = labels != target_index[j]
            coherence.append(mean_pairwise_cosine(features[others]) if int(others.sum()) > 1 else 1.0)
    return TargetedResult(list(targets), [float(s) for s in sizes], [bool(r) for r in reached], success,
                          coherence, best_mask, best_pattern, time.perf_counter() - start)
