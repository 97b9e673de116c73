"""The full-image detector: a universal trigger that touches every pixel a little (SIG, WaNet, Blended).

A mask-and-pattern trigger (patch.py) replaces a few pixels; it cannot express a sinusoid added to
the whole image (SIG, Barni et al. 2019), a smooth warp (WaNet, Nguyen & Tran 2021) or a blend
with a noise image (Blended, Chen et al. 2017). This detector optimises one universal trigger of
each of three small-budget families on the clean shots x (N, 3, H, W) in [0, 1]:

    additive:  x' = clamp(x + delta, 0, 1),        delta = epsilon * tanh(u),        u (3, H, W)
    blend:     x' = (1 - a) x + a p,               p = sigmoid(v), a fixed,         v (3, H, W)
    warp:      x' = grid_sample(x, I + f),         f = bicubic_up(d * tanh(w)),     w (k, k, 2), f (H, W, 2)

each with the contrastive collapse objective of the mask-and-pattern inversion
(:func:`~clipguard.detection.inversion.contrastive_inversion_loss`: triggered shots of different
classes pulled together, away from every clean shot). The budget (epsilon, a, d) is the only
constraint: no size term. Classify the triggered shots zero-shot; the score is the collapse
(:func:`~clipguard.detection.inversion.collapse_score`: the share of triggered shots of other
classes read as the most predicted class), the maximum over the families, the target the best
family's. Nothing but the final zero-shot classification depends on the number of classes.

Deviation (ours; no paper inverts these families for a CLIP): the families, their budgets and the
fixed blend ratio are our choice; the warp is a k x k flow field bicubically upsampled, as WaNet draws its own.
Deviation: only ``additive`` runs by default: ``blend`` at a = 0.2 also collapses the clean built-in model
(towards bag) and ``warp`` collapses clean tiny CLIPs as much as WaNet ones (docs/methods.md, full-image trigger).
Deviation: one inversion per family (``steps`` Adam steps of ``batch_size`` anchors), no restarts.
Measurements: docs/methods.md (full-image trigger) and docs/results/detection.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import Detector, DetectorConfig, Finding, register, zero_shot_head
from clipguard.detection.inversion import collapse_score, contrastive_inversion_loss, mean_pairwise_cosine
from clipguard.distributed import broadcast_from_main
from clipguard.engine import TrainConfig, fit
from clipguard.models.clip import ClipModel

FAMILIES = ("additive", "blend", "warp")


# --------------------------------------------------------------------- triggers (pure functions)
def add_perturbation(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x' = clamp(x + delta, 0, 1). images (B, 3, H, W), delta (3, H, W)."""
    return (images + delta).clamp(0, 1)


def blend_pattern(images: torch.Tensor, pattern: torch.Tensor, ratio: float) -> torch.Tensor:
    """x' = (1 - ratio) x + ratio p. images (B, 3, H, W), pattern (3, H, W) in [0, 1]."""
    return (1 - ratio) * images + ratio * pattern


def warp_images(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """x' = grid_sample(x, identity + flow): bilinear, border padding, align_corners=True.

    images (B, 3, H, W); flow (H, W, 2) in grid units ([-1, 1] spans the image; x then y).
    """
    size = images.shape[-1]
    axis = torch.linspace(-1, 1, size, device=images.device)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    grid = (torch.stack((cols, rows), dim=-1) + flow).clamp(-1, 1)  # (H, W, 2)
    return F.grid_sample(images, grid.expand(len(images), -1, -1, -1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def upsample_flow(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """A (k, k, 2) flow field bicubically upsampled to (size, size, 2) (align_corners=True, as WaNet)."""
    return F.interpolate(coarse.permute(2, 0, 1)[None], size=size, mode="bicubic",
                         align_corners=True)[0].permute(1, 2, 0)


# ---------------------------------------------------------------------- config
@dataclass
class FullImageConfig(DetectorConfig):
    families: tuple[str, ...] = ("additive",)  # trigger families inverted (additive | blend | warp); score: the max
    steps: int = 100  # optimiser steps per family (rounded up to whole passes over the shots)
    batch_size: int = 32  # triggered anchors per step (negatives: their clean versions); capped at the shots
    lr: float = 0.1  # Adam on the trigger's free parameters (cosine schedule)
    temperature: float = 0.1  # InfoNCE temperature
    epsilon: float = 0.15  # additive: L-inf bound of delta, in [0, 1] image units (SIG's peak: 60/255 = 0.24)
    blend_ratio: float = 0.2  # blend: weight a of the free pattern (Blended's 0.2)
    warp_grid: int = 4  # warp: k, the flow field's control points per side (WaNet's 4)
    warp_shift: float = 4.0  # warp: largest displacement of a control point, in pixels (WaNet here: ~4 px mean)

    def __post_init__(self):
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ValueError(f"FullImageConfig.families must be a non-empty subset of {FAMILIES}, got {self.families}")
        self.families = tuple(self.families)
        for name, low, high in (("steps", 1, 10**6), ("batch_size", 2, 10**6), ("lr", 1e-8, 100.0),
                                ("temperature", 1e-4, 10.0), ("epsilon", 1e-4, 1.0), ("blend_ratio", 1e-4, 1.0),
                                ("warp_grid", 2, 64), ("warp_shift", 1e-3, 100.0)):
            self._check_range(name, low, high)


# ------------------------------------------------------------------- inversion
class FullImageTrigger(nn.Module):
    """The free parameters of one family's trigger; ``forward(images)`` applies it, ``tensors()``
    returns the trigger in image space (what :func:`apply_full_image` takes)."""

    def __init__(self, family: str, image_size: int, config: FullImageConfig, generator: torch.Generator):
        super().__init__()
        self.family, self.image_size, self.config = family, image_size, config
        shape = (config.warp_grid, config.warp_grid, 2) if family == "warp" else (3, image_size, image_size)
        scale = 1.0 if family == "blend" else 0.1  # blend: a random pattern; the others start near the identity
        self.free = nn.Parameter(scale * torch.randn(shape, generator=generator))

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.family == "additive":
            return {"delta": self.config.epsilon * torch.tanh(self.free)}  # (3, H, W)
        if self.family == "blend":
            return {"pattern": torch.sigmoid(self.free)}  # (3, H, W)
        shift = 2 * self.config.warp_shift / (self.image_size - 1)  # pixels -> grid units
        return {"flow": upsample_flow(shift * torch.tanh(self.free), self.image_size)}  # (H, W, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return apply_full_image(images, self.family, self.tensors(), self.config.blend_ratio)


def apply_full_image(images: torch.Tensor, family: str, tensors: dict[str, torch.Tensor],
                     blend_ratio: float = 0.2) -> torch.Tensor:
    """One family's trigger on images (B, 3, H, W): ``tensors`` holds delta, pattern or flow."""
    if family == "additive":
        return add_perturbation(images, tensors["delta"].to(images.device))
    if family == "blend":
        return blend_pattern(images, tensors["pattern"].to(images.device), blend_ratio)
    return warp_images(images, tensors["flow"].to(images.device))


class _FullImageTask(nn.Module):
    """Loss of one batch (clean images, their clean features, labels) for the engine."""

    def __init__(self, trigger: FullImageTrigger, clip: ClipModel, temperature: float):
        super().__init__()
        self.trigger, self.clip, self.temperature = trigger, clip, temperature

    def forward(self, batch) -> torch.Tensor:
        images, clean, labels = batch
        triggered = self.clip.encode_image(self.trigger(images), normalize=True)  # (B, D)
        return contrastive_inversion_loss(triggered, clean, labels, self.temperature)


def invert_full_image(clip: ClipModel, images: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                      family: str, config: FullImageConfig) -> dict[str, torch.Tensor]:
    """One family's trigger optimised on shots ``images`` (N, 3, H, W) with clean features (N, D)
    and labels (N,); returns its image-space tensors (CPU). CLIP's weights are not changed."""
    generator = torch.Generator().manual_seed(config.seed + FAMILIES.index(family))
    trigger = FullImageTrigger(family, images.shape[-1], config, generator)
    batch_size = min(config.batch_size, len(images))
    epochs = -(-config.steps // (len(images) // batch_size))
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=config.lr, optimizer="adamw", weight_decay=0.0,
                        grad_clip=0.0, seed=config.seed, device=config.device, amp=False)
    # the InfoNCE of a batch does not split over DDP processes (as in invert_trigger)
    fit(_FullImageTask(trigger, clip, config.temperature), TensorDataset(images, clean.cpu(), labels), train,
        desc=f"full-image inversion ({family})", split_batches=False)
    broadcast_from_main([trigger.free])
    with torch.no_grad():
        return {k: v.cpu() for k, v in trigger.tensors().items()}


# -------------------------------------------------------------------- detector
@register
class FullImageDetector(Detector):
    """Score: the largest collapse over the full-image trigger families (module docstring)."""

    name = "full-image"
    config_class = FullImageConfig

    def run(self, clip: ClipModel, shots: ImageSet, head: torch.Tensor | None = None) -> Finding:
        start = time.perf_counter()
        if len(torch.unique(shots.labels)) < 2:
            raise ClipguardError("the full-image detector needs clean shots of at least two classes")
        config = self.config
        clip.requires_grad_(False)
        images = shots.float_images()  # (N, 3, H, W)
        with torch.no_grad():
            clean = clip.encode_image(images.to(clip.device), normalize=True)  # (N, D)
        texts = zero_shot_head(clip, shots) if head is None else head  # (C, D)
        results = {}
        for family in config.families:
            tensors = invert_full_image(clip, images, clean, shots.labels, family, config)
            with torch.no_grad():
                triggered = clip.encode_image(
                    apply_full_image(images, family, tensors, config.blend_ratio).to(clip.device), normalize=True)
                predictions = (triggered @ texts.to(triggered.device).T).argmax(-1).cpu()  # (N,)
            target, collapse = collapse_score(predictions, shots.labels, len(shots.classes))
            results[family] = (collapse, target, tensors,
                               mean_pairwise_cosine(triggered) - mean_pairwise_cosine(clean))
        best = max(config.families, key=lambda f: results[f][0])  # ties: the first family listed
        collapse, target, tensors, embedding_collapse = results[best]
        ratio = config.blend_ratio
        details = {"family": best, "collapse": round(collapse, 4), "embedding_collapse": round(embedding_collapse, 4),
                   **{f"collapse_{f}": round(results[f][0], 4) for f in config.families},
                   **{f"target_{f}": shots.classes[results[f][1]] for f in config.families},
                   "seconds": round(time.perf_counter() - start, 2)}
        return Finding(detector=self.name, score=collapse, target_name=shots.classes[target], tensors=tensors,
                       details=details, apply=lambda x: apply_full_image(x, best, tensors, ratio))
