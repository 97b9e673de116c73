"""Contrastive trigger inversion and backdoor detection (CBPT stage 1; docs/methods.md, CBPT).

A trigger is a mask m (H, W) and a pattern p (3, H, W), both through a sigmoid, applied in
data space to images in [0, 1]:  x' = (1 - m) * x + m * p.  It is optimised on the defender's
clean few-shot images so that triggered images of *different* classes embed close together
and away from every clean image (the anchor's own clean version included):

    L = InfoNCE(anchor = triggered x'_i, positives = {x'_j : y_j != y_i}, negatives = {x_k})
        + lambda * mean(m)  [+ tv_weight * TV(m)]

A backdoored encoder has a shortcut for this: its trigger sends every image to one point. A
clean encoder can only collapse images with a large mask. Shapes: shots (N, 3, H, W), their
features (N, D), class features (C, D).

The suspected target is the class most triggered shots are predicted as (zero-shot, template
class features); the *collapse score* is the fraction of triggered shots of other classes
predicted as it. The verdict is "backdoored" when the score reaches ``threshold``, which was
calibrated on the built-in benchmark (docs/results/detection.md).

The paper behind CBPT does not publish its inversion; these choices are ours:
Deviation: lambda is multiplied or divided by ``lambda_factor`` each step to hold the mask area at
``mask_budget`` (comparable scores across models), instead of Neural Cleanse's smallest-mask search.
Deviation: each step takes ``batch_size`` (32) anchors, negatives their own clean versions, not all shots.
Deviation: 100 Adam steps at lr 0.3, for time on 2 CPU cores (docs/results/detection.md).
Deviation: one inversion is noisy, so :func:`detect_backdoor` keeps the most collapsing of ``restarts``.
Deviation (off): ``tv_weight`` * TV(m), TABOR's smoothness prior; it did not find the attacker's patch.
Numbers (lr, restarts, threshold, TV weights): docs/results/detection.md and docs/results/cbpt.md.

Example:
    >>> result = detect_backdoor(load_clip("runs/attacks/badnet-0.03"), shots, InversionConfig(seed=0))
    >>> result.verdict()
    'backdoored: suspected target bag (collapse 0.80, mask area 2.8%)'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.data import TensorDataset

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet
from clipguard.distributed import broadcast_from_main
from clipguard.engine import TrainConfig, fit
from clipguard.models.zeroshot import class_text_features
from clipguard.models.clip import ClipModel

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- losses
def apply_trigger(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x' = (1 - m) * x + m * p. images (B, 3, H, W), mask (H, W), pattern (3, H, W), all in [0, 1]."""
    return (1 - mask) * images + mask * pattern  # (B, 3, H, W)


def contrastive_inversion_loss(triggered: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE of the inversion. triggered, clean: (N, D) normalised; labels (N,).

    For anchor i: positives are triggered j with y_j != y_i, negatives all clean k (k = i
    included). Loss_i = -log(sum_pos e^{s/t} / (sum_pos e^{s/t} + sum_neg e^{s/t})); returns the mean.

    >>> a = torch.tensor([[1.0, 0.0]]).repeat(2, 1); c = torch.tensor([[0.0, 1.0]]).repeat(2, 1)
    >>> round(contrastive_inversion_loss(a, c, torch.tensor([0, 1]), 1.0).item(), 4)  # -log(e/(e+2))
    0.5514
    """
    positive = labels[:, None] != labels[None, :]  # (N, N)
    if not positive.any(1).all():
        raise ValueError("contrastive inversion needs shots of at least two classes")
    to_triggered = (triggered @ triggered.T / temperature).masked_fill(~positive, float("-inf"))  # (N, N)
    to_clean = triggered @ clean.T / temperature  # (N, N)
    log_positive = torch.logsumexp(to_triggered, dim=1)  # (N,)
    log_all = torch.logsumexp(torch.cat([to_triggered, to_clean], dim=1), dim=1)  # (N,)
    return (log_all - log_positive).mean()


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a (H, W) mask: the mean absolute difference between
    vertical neighbours plus that between horizontal neighbours.

    >>> m = torch.zeros(4, 4); m[:2, :2] = 1; round(total_variation(m).item(), 4)  # 2 + 2 edges of 12
    0.3333
    """
    return (mask[1:] - mask[:-1]).abs().mean() + (mask[:, 1:] - mask[:, :-1]).abs().mean()


def collapse_score(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[int, float]:
    """(target, score): the class most triggered images are predicted as, and the fraction of
    triggered images *of other classes* predicted as it. predictions, labels: (N,) int64.

    >>> collapse_score(torch.tensor([2, 2, 2, 0]), torch.tensor([0, 1, 2, 2]), 3)
    (2, 0.6666666666666666)
    """
    target = int(torch.bincount(predictions, minlength=num_classes).argmax())
    others = labels != target
    return target, float((predictions[others] == target).float().mean()) if others.any() else 0.0


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of normalised features (N, D), N >= 2.

    >>> mean_pairwise_cosine(torch.eye(3))
    0.0
    """
    n = len(features)
    gram = features @ features.T  # (N, N)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


# ---------------------------------------------------------------------- config
@dataclass
class InversionConfig:
    steps: int = 100  # optimiser steps (rounded up to whole passes over the shots)
    batch_size: int = 32  # triggered anchors per step (negatives: their clean versions); capped at the shots
    lr: float = 0.3  # Adam on the mask and pattern logits (cosine schedule)
    temperature: float = 0.1  # InfoNCE temperature
    mask_budget: float = 0.03  # mask area (mean of m) the adaptive lambda aims at
    lambda_init: float = 1.0  # initial weight of the mask L1 term
    lambda_factor: float = 1.1  # lambda is multiplied / divided by this after each step
    tv_weight: float = 0.0  # weight of the mask's total variation (our variant: favours one compact blob)
    # calibrated on the built-in benchmark (docs/results/detection.md)
    threshold: float = 0.6  # collapse score at or above which the verdict is "backdoored"
    restarts: int = 3  # inversions from seeds seed, seed + 1, ...; detection reports the most collapsing
    seed: int = 0  # seeds the pattern initialisation
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        for name, low, high in (("steps", 1, 10**6), ("batch_size", 2, 10**6), ("lr", 1e-8, 100.0),
                                ("temperature", 1e-4, 10.0), ("mask_budget", 1e-4, 1.0), ("lambda_init", 0.0, 1e6),
                                ("lambda_factor", 1.0, 10.0), ("tv_weight", 0.0, 1e4), ("threshold", 0.0, 1.0),
                                ("restarts", 1, 100)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"InversionConfig.{name} must be in [{low}, {high}], got {value}")


@dataclass
class DetectionResult:
    """What trigger inversion found: the dummy trigger, the suspected target and the verdict."""

    mask: torch.Tensor  # (H, W) in [0, 1]
    pattern: torch.Tensor  # (3, H, W) in [0, 1]
    target: int  # suspected target class index (majority prediction of triggered shots)
    target_name: str
    collapse: float  # fraction of triggered other-class shots predicted as the target
    mask_area: float  # mean of the mask
    embedding_collapse: float  # mean pairwise cosine of triggered minus that of clean shot features
    threshold: float
    seconds: float = 0.0
    triggers: list = field(default_factory=list)  # (mask, pattern) of every restart, this one first

    @property
    def backdoored(self) -> bool:
        return self.collapse >= self.threshold

    def verdict(self) -> str:
        if not self.backdoored:
            return (f"not backdoored (collapse {self.collapse:.2f} < {self.threshold:.2f}; "
                    f"most likely target {self.target_name}, mask area {100 * self.mask_area:.1f}%)")
        return (f"backdoored: suspected target {self.target_name} "
                f"(collapse {self.collapse:.2f}, mask area {100 * self.mask_area:.1f}%)")

    def as_dict(self) -> dict:
        """The scalar results, ready for JSON."""
        return {"backdoored": self.backdoored, "target": self.target, "target_name": self.target_name,
                "collapse": round(self.collapse, 4), "mask_area": round(self.mask_area, 4),
                "embedding_collapse": round(self.embedding_collapse, 4), "threshold": self.threshold,
                "seconds": round(self.seconds, 2)}


# ------------------------------------------------------------------- inversion
class TriggerParameters(nn.Module):
    """Mask and pattern logits; ``mask()`` / ``pattern()`` are their sigmoids."""

    def __init__(self, image_size: int, budget: float, generator: torch.Generator):
        super().__init__()
        start = torch.logit(torch.tensor(budget))  # the initial mask sits at the budget
        self.mask_logits = nn.Parameter(torch.full((image_size, image_size), float(start)))  # (H, W)
        self.pattern_logits = nn.Parameter(torch.randn(3, image_size, image_size, generator=generator))  # (3, H, W)

    def mask(self) -> torch.Tensor:
        return torch.sigmoid(self.mask_logits)

    def pattern(self) -> torch.Tensor:
        return torch.sigmoid(self.pattern_logits)


class _InversionTask(nn.Module):
    """Loss of one batch (clean images, their clean features, labels) for the engine.

    Holds lambda as a buffer and adapts it after each loss: x factor when the mask is over
    budget, / factor when under, so the L1 term keeps the mask near ``mask_budget``.
    """

    def __init__(self, trigger: TriggerParameters, clip: ClipModel, config: InversionConfig):
        super().__init__()
        self.trigger, self.clip, self.config = trigger, clip, config
        self.register_buffer("weight", torch.tensor(config.lambda_init))

    def forward(self, batch) -> torch.Tensor:
        images, clean, labels = batch
        mask = self.trigger.mask()
        triggered = self.clip.encode_image(apply_trigger(images, mask, self.trigger.pattern()), normalize=True)
        area = mask.mean()
        loss = contrastive_inversion_loss(triggered, clean, labels, self.config.temperature) + float(self.weight) * area
        if self.config.tv_weight:
            loss = loss + self.config.tv_weight * total_variation(mask)
        with torch.no_grad():
            over = bool(area > self.config.mask_budget)
            self.weight.mul_(self.config.lambda_factor if over else 1 / self.config.lambda_factor).clamp_(1e-3, 1e4)
        return loss


def frozen_shots(clip: ClipModel, shots: ImageSet, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shots' images (N, 3, H, W) and clean normalised features (N, D), with ``clip`` frozen;
    ``what`` (the caller, for the message) needs shots of at least two classes."""
    if len(torch.unique(shots.labels)) < 2:
        raise ClipguardError(f"{what} needs clean shots of at least two classes")
    clip.requires_grad_(False)
    images = shots.float_images()  # (N, 3, H, W)
    with torch.no_grad():
        clean = clip.encode_image(images.to(clip.device), normalize=True)  # (N, D)
    return images, clean


def invert_trigger(clip: ClipModel, shots: ImageSet, config: InversionConfig,
                   class_features: torch.Tensor | None = None, desc: str = "trigger inversion") -> DetectionResult:
    """Optimise a mask + pattern on the clean ``shots`` (N images, >= 2 classes) of ``clip``.

    ``class_features`` (C, D) classify the triggered shots (default: the template features of
    ``shots.classes``); ``desc`` labels the progress bar. Returns a :class:`DetectionResult`;
    CLIP's weights are not changed.
    """
    import time

    start = time.perf_counter()
    images, clean = frozen_shots(clip, shots, "trigger inversion")
    trigger = TriggerParameters(images.shape[-1], config.mask_budget, torch.Generator().manual_seed(config.seed))
    task = _InversionTask(trigger, clip, config)
    batch_size = min(config.batch_size, len(images))
    epochs = -(-config.steps // (len(images) // batch_size))
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=config.lr, optimizer="adamw", weight_decay=0.0,
                        grad_clip=0.0, seed=config.seed, device=config.device, amp=False)
    # the InfoNCE of a batch does not split over DDP processes: each runs the whole batch, and
    # rank 0's trigger is kept so that all hold the same one even if a GPU kernel is not reproducible
    fit(task, TensorDataset(images, clean.cpu(), shots.labels), train, desc=desc, split_batches=False)
    broadcast_from_main([trigger.mask_logits, trigger.pattern_logits])
    with torch.no_grad():
        mask, pattern = trigger.mask().cpu(), trigger.pattern().cpu()
        triggered = clip.encode_image(apply_trigger(images, mask, pattern).to(clip.device), normalize=True)
        texts = class_text_features(clip, shots.classes) if class_features is None else class_features
        predictions = (triggered @ texts.T).argmax(-1).cpu()
    target, score = collapse_score(predictions, shots.labels, len(shots.classes))
    result = DetectionResult(
        mask=mask, pattern=pattern, target=target, target_name=shots.classes[target], collapse=score,
        mask_area=float(mask.mean()), embedding_collapse=mean_pairwise_cosine(triggered) - mean_pairwise_cosine(clean),
        threshold=config.threshold, seconds=time.perf_counter() - start,
    )
    logger.info("trigger inversion: %s", result.verdict())
    return result


def detect_backdoor(clip: ClipModel, shots: ImageSet, config: InversionConfig | None = None,
                    class_features: torch.Tensor | None = None) -> DetectionResult:
    """Is ``clip`` backdoored? ``config.restarts`` trigger inversions on the clean ``shots``
    (seeds ``seed``, ``seed + 1``, ...); returns the most collapsing one, with every restart's
    (mask, pattern) in ``triggers``, the returned one first (for inspection: CBPT's L_trig uses
    only the returned, most collapsing trigger, ``mask`` and ``pattern``).

    >>> detect_backdoor(load_clip("builtin"), shots).backdoored
    False
    """
    config = config or InversionConfig()
    results = [invert_trigger(clip, shots, replace(config, seed=config.seed + k), class_features,
                              desc="trigger inversion" + (f" (restart {k + 1}/{config.restarts})"
                                                          if config.restarts > 1 else ""))
               for k in range(config.restarts)]
    best = max(results, key=lambda r: r.collapse)
    best.triggers = [(best.mask, best.pattern)] + [(r.mask, r.pattern) for r in results if r is not best]
    best.seconds = sum(r.seconds for r in results)
    logger.info("backdoor detection over %d restarts: %s", len(results), best.verdict())
    return best


def save_detection_figure(result: DetectionResult, shots: ImageSet, path, examples: int = 6,
                          clip: ClipModel | None = None, class_features: torch.Tensor | None = None) -> None:
    """PNG in three rows: the inverted mask, pattern and m * p; ``examples`` clean shots (titled
    with their true class); the same shots with the inverted trigger.

    With ``clip`` each triggered shot is titled with the class ``clip`` predicts for it (zero-shot
    against ``class_features`` (C, D), default the template features of ``shots.classes``), red
    when that is the suspected target; without it the triggered row has no titles.
    """
    import matplotlib.pyplot as plt

    from clipguard.eval.plots import save_figure

    picks = torch.linspace(0, len(shots) - 1, examples).round().long()
    images = shots.float_images(picks)  # (E, 3, H, W)
    triggered = apply_trigger(images, result.mask, result.pattern)  # (E, 3, H, W)
    predictions = None
    if clip is not None:
        with torch.no_grad():
            features = clip.encode_image(triggered.to(clip.device), normalize=True)  # (E, D)
            texts = class_text_features(clip, shots.classes) if class_features is None else class_features
            predictions = (features @ texts.to(features.device).T).argmax(-1).cpu()  # (E,)
    columns = max(3, examples)
    fig, axes = plt.subplots(3, columns, figsize=(1.5 * columns, 5.4), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    panels = (("mask", result.mask, "magma"), ("pattern", result.pattern.permute(1, 2, 0), None),
              ("mask x pattern", (result.mask * result.pattern).permute(1, 2, 0), None))
    for ax, (title, image, cmap) in zip(axes[0], panels):
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("on")
    for col in range(examples):
        true = int(shots.labels[picks[col]])
        for row, tile in ((1, images[col]), (2, triggered[col])):
            axes[row, col].imshow(tile.permute(1, 2, 0).clamp(0, 1).numpy())
            axes[row, col].axis("on")
        axes[1, col].set_title(shots.classes[true], fontsize=7)
        if predictions is not None:
            predicted = int(predictions[col])
            hit = predicted == result.target and true != result.target
            axes[2, col].set_title(f"read as {shots.classes[predicted]}", fontsize=7,
                                   color="crimson" if hit else "black")
    axes[0, 0].set_ylabel("inverted trigger", fontsize=8)
    axes[1, 0].set_ylabel("clean shot\n(true class)", fontsize=8)
    axes[2, 0].set_ylabel("with inverted trigger" + ("\n(prediction)" if predictions is not None else ""), fontsize=8)
    key = f"\nred: a shot of another class read as the suspected target ({result.target_name})"
    fig.suptitle(result.verdict() + (key if predictions is not None else ""), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
