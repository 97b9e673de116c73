"""The encoder detector: DECREE's label-free score of an image encoder (images only, no class names).

DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023) inverts the
smallest mask-and-pattern trigger that makes the embeddings of all triggered images alike. A
backdoored encoder maps its trigger to one point, so a small mask suffices; a clean one needs a
large mask that covers most of the image. On clean images x (N, 3, H, W) in [0, 1]:

    x' = (1 - m) x + m p,   m = sigmoid(a) (H, W),  p = sigmoid(b) (3, H, W)
    L  = - cos(x') + lambda * PL1(m),   cos(x') = mean over pairs i != j of f(x'_i) . f(x'_j)
    PL1(m) = ||m||_1 / (H W)   (the mask's relative L1 size)

with f the normalised image embedding. lambda follows DECREE's schedule: x ``lambda_factor``
after ``patience`` steps in a row that reach the similarity threshold tau, / ``lambda_factor``
after ``patience`` steps in a row that miss it, back to ``lambda_init`` after 2 * ``patience``
successes below ``lambda_min``. The smallest mask of a step that reached tau is kept.
score = 1 - PL1 of that mask (higher = more backdoor-like); PL1 = 1 when tau was never reached.

Deviation: tau is relative, tau = c0 + ``similarity`` * (1 - c0) with c0 the clean shots' mean
pairwise cosine (DECREE's 0.99 is absolute; encoders differ in how alike their clean embeddings are).
Deviation: tau's share 0.6, not 0.9: the attacker's own trigger brings a backdoored tiny CLIP's shots
only 0.5-0.75 of the way to 1 (docs/methods.md); above that, the mask must grow for clean and backdoored alike.
Deviation: the mask starts at 0.1 * U(0, 1) (DECREE: U(0, 1)), so that a fixed step budget can reach a small mask.
Deviation: the penalty is lambda * PL1 (the mean of m), not lambda * ||m||_1, so lambda_init does not depend on H, W.
Deviation: a fixed number of steps (``steps``, engine's AdamW, cosine schedule), no early stop; DECREE: up to 1,000 epochs.
Deviation: the shots (a few per class) are the shadow set; their labels are not read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import Detector, DetectorConfig, Finding, register
from clipguard.detection.inversion import apply_trigger, mean_pairwise_cosine
from clipguard.distributed import broadcast_from_main
from clipguard.engine import TrainConfig, fit
from clipguard.models.clip import ClipModel


def pairwise_similarity(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine over distinct pairs of normalised features (N, D), N >= 2, differentiable."""
    n = len(features)
    gram = features @ features.T  # (N, N)
    return (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))


@dataclass
class EncoderConfig(DetectorConfig):
    steps: int = 300  # optimiser steps (rounded up to whole passes over the shots)
    batch_size: int = 32  # images per step; capped at the shots
    lr: float = 0.3  # Adam on the mask and pattern logits (cosine schedule)
    similarity: float = 0.6  # tau as a share of the way from the clean mean cosine c0 to 1
    lambda_init: float = 1.0  # initial weight of PL1 (DECREE: 1e-3 on the unnormalised L1)
    lambda_factor: float = 5.0  # lambda is multiplied / divided by this (DECREE's 5)
    lambda_min: float = 1e-5  # below it, 2 * patience successes reset lambda to lambda_init
    patience: int = 5  # steps in a row that reach (or miss) tau before lambda moves (DECREE's 5)

    def __post_init__(self):
        for name, low, high in (("steps", 1, 10**6), ("batch_size", 2, 10**6), ("lr", 1e-8, 100.0),
                                ("similarity", 0.0, 0.999), ("lambda_init", 1e-8, 1e6), ("lambda_factor", 1.0, 100.0),
                                ("lambda_min", 0.0, 1e6), ("patience", 1, 10**4)):
            self._check_range(name, low, high)


class _DecreeTask(nn.Module):
    """Loss of one batch of images for the engine; adapts lambda and keeps the smallest mask that
    reached tau (DECREE's schedule, module docstring)."""

    def __init__(self, clip: ClipModel, image_size: int, tau: float, config: EncoderConfig, generator: torch.Generator):
        super().__init__()
        self.clip, self.tau, self.config = clip, tau, config
        mask = 0.1 * torch.rand(image_size, image_size, generator=generator)  # a small random start (DECREE: U(0, 1))
        self.mask_logits = nn.Parameter(torch.logit(mask.clamp_min(1e-3)))  # (H, W)
        self.pattern_logits = nn.Parameter(torch.randn(3, image_size, image_size, generator=generator))  # (3, H, W)
        self.weight, self.up, self.down, self.low = config.lambda_init, 0, 0, 0
        self.best: tuple[float, torch.Tensor, torch.Tensor] | None = None  # (PL1, mask, pattern)

    def trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.mask_logits), torch.sigmoid(self.pattern_logits)

    def forward(self, batch) -> torch.Tensor:
        (images,) = batch
        mask, pattern = self.trigger()
        features = self.clip.encode_image(apply_trigger(images, mask, pattern), normalize=True)  # (B, D)
        similarity, size = pairwise_similarity(features), mask.mean()
        loss = -similarity + self.weight * size
        self._schedule(similarity.item() >= self.tau, size.item(), mask, pattern)
        return loss

    def _schedule(self, reached: bool, size: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        c = self.config
        if reached and (self.best is None or size < self.best[0]):
            self.best = (size, mask.detach().cpu().clone(), pattern.detach().cpu().clone())
        self.low = self.low + 1 if reached and self.weight < c.lambda_min else 0
        if self.low > 2 * c.patience:
            self.weight, self.up, self.down, self.low = c.lambda_init, 0, 0, 0
        self.up, self.down = (self.up + 1, 0) if reached else (0, self.down + 1)
        if self.up > c.patience:
            self.weight, self.up = min(self.weight * c.lambda_factor, 1e5), 0
        elif self.down > c.patience:
            self.weight, self.down = (self.weight / c.lambda_factor if self.weight >= c.lambda_min else self.weight), 0


@register
class EncoderDetector(Detector):
    """Score: 1 - PL1 of the smallest trigger that makes the triggered embeddings alike (DECREE)."""

    name = "encoder"
    config_class = EncoderConfig
    uses_class_names = False

    def run(self, clip: ClipModel, shots: ImageSet, head: torch.Tensor | None = None) -> Finding:
        start = time.perf_counter()
        if len(shots) < 2:
            raise ClipguardError("the encoder detector needs at least two clean shots")
        config = self.config
        clip.requires_grad_(False)
        images = shots.float_images()  # (N, 3, H, W)
        with torch.no_grad():
            clean = mean_pairwise_cosine(clip.encode_image(images.to(clip.device), normalize=True))
        tau = clean + config.similarity * (1 - clean)
        task = _DecreeTask(clip, images.shape[-1], tau, config, torch.Generator().manual_seed(config.seed))
        batch_size = min(config.batch_size, len(images))
        epochs = -(-config.steps // (len(images) // batch_size))
        train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=config.lr, optimizer="adamw", weight_decay=0.0,
                            grad_clip=0.0, seed=config.seed, device=config.device, amp=False)
        # a batch's pairwise similarity does not split over DDP processes: each runs the whole batch
        fit(task, TensorDataset(images), train, desc="encoder trigger inversion (DECREE)", split_batches=False)
        broadcast_from_main([task.mask_logits, task.pattern_logits])
        reached = task.best is not None
        if reached:
            size, mask, pattern = task.best
        else:  # never alike enough: report the last trigger, with the largest relative size
            with torch.no_grad():
                mask, pattern = (t.cpu() for t in task.trigger())
            size = 1.0
        with torch.no_grad():
            triggered = clip.encode_image(apply_trigger(images, mask, pattern).to(clip.device), normalize=True)
        details = {"pl1": round(size, 4), "reached": reached, "tau": round(tau, 4), "clean_similarity": round(clean, 4),
                   "triggered_similarity": round(mean_pairwise_cosine(triggered), 4),
                   "seconds": round(time.perf_counter() - start, 2)}
        return Finding(detector=self.name, score=1.0 - size, target_name=None,
                       tensors={"mask": mask, "pattern": pattern}, details=details,
                       apply=lambda x: apply_trigger(x, mask.to(x.device), pattern.to(x.device)))
