"""PAR, Perturb and Recover (Singh, Croce and Hein, "Perturb and Recover: Fine-tuning for Effective
Backdoor Removal from CLIP", 2024): fine-tune the whole suspect on clean pairs while repelling its
embeddings from the frozen suspect's.

    L = L_CLIP(f(x~), g(t)) - w * (c(d_I) + c(d_T)),    d_I = mean_b ||f(x~_b) - f0(x~_b)||^2,
                                                        d_T = mean_b ||g(t_b) - g0(t_b)||^2,
    c(d) = d if d <= tau else 0

f, g: the model being cleaned (image, text), L2-normalised outputs; f0, g0: the frozen suspect;
x~: a perturbed clean image, seen by both; w = 0.5, tau = 2.15 as in the public code's
``losses.py``. Once a batch's mean squared distance passes tau, its repulsion term and gradient
vanish, so the model drifts only so far from the suspect while the CLIP loss keeps it accurate.

The perturbation, as the public code's training transform does it, independently per image:
- with probability 0.5, clipped Gaussian noise: x + clip(N(0, 0.2^2), 0, 1), clipped to [0, 1];
- with probability 0.5, a small square (0.5-1 % of the area) erased to the mean colour (0 after
  CLIP's normalisation).
Each draw is seeded by (seed, epoch, index), so runs repeat.

Shapes: images (B, 3, H, W) in [0, 1]; features (B, D), L2-normalised; caption ids (B,).

Deviation: the warm-up rises from 0 to the peak lr (the public schedule starts at 10x the peak and
falls to it over half the run); then cosine decay as in every clipguard fine-tune.
Deviation: the logit scale enters the CLIP loss detached, as the public code's ``.item()`` does.
Deviation (ours): the built-in model's recipe is CleanCLIP's 1,000 pairs x 10 epochs with lr 1e-4,
chosen by measurement there (docs/results/baselines.md), not the public 250k pairs, 2 epochs, lr 3e-6.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import nn

from clipguard.defenses.base import register
from clipguard.defenses.weights import WeightFinetune, WeightFinetuneConfig, finetune_on_pairs, sample_pairs
from clipguard.distributed import gather_batch
from clipguard.losses import clip_contrastive_loss
from clipguard.models.clip import ClipModel
from clipguard.models.contrastive import CaptionedImages, caption_collate


@dataclass
class PARConfig(WeightFinetuneConfig):
    epochs: int = 10  # passes over the pairs (public recipe: 2 over 250k pairs)
    lr: float = 1e-4  # AdamW peak learning rate, cosine decay (public recipe: 3e-6 at CC3M scale; ours: docs/results/baselines.md)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay on weight matrices (public code: 1e-4)
    repel_weight: float = 0.5  # w: weight of the two repulsion terms
    tau: float = 2.15  # a term is dropped once the batch mean squared distance exceeds tau
    noise_std: float = 0.2  # std of the clipped Gaussian noise
    noise_p: float = 0.5  # probability an image gets the noise
    erase_p: float = 0.5  # probability an image gets a square erased
    seed: int = 0  # seeds the pair sample, the perturbations, batch order and the fine-tune
    device: str = "auto"  # auto | cpu | cuda

    method: ClassVar[str] = "par"

    def __post_init__(self):
        super().__post_init__()
        self._check_range("batch_size", 2, 10**6)
        self._check_range("lr", 1e-9, 1.0)
        self._check_range("repel_weight", 0.0, 100.0)
        self._check_range("tau", 0.0, 4.0)
        self._check_range("noise_std", 0.0, 1.0)
        self._check_range("noise_p", 0.0, 1.0)
        self._check_range("erase_p", 0.0, 1.0)


def perturb(image: torch.Tensor, generator: torch.Generator, config: PARConfig) -> torch.Tensor:
    """PAR's perturbation of one float image (3, H, W) in [0, 1] (see the module docstring)."""
    out = image.clone()
    if float(torch.rand(1, generator=generator)) < config.noise_p:
        noise = (torch.randn(out.shape, generator=generator) * config.noise_std).clamp(0, 1)
        out = (out + noise).clamp(0, 1)
    if float(torch.rand(1, generator=generator)) < config.erase_p:
        _, height, width = out.shape
        area = height * width * (0.005 + 0.005 * float(torch.rand(1, generator=generator)))
        side = max(1, min(height - 1, round(area ** 0.5)))
        row = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        col = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        out[:, row : row + side, col : col + side] = out.mean((1, 2), keepdim=True)
    return out


class PerturbedPairs(CaptionedImages):
    """(perturbed image, caption) pairs of a corpus; the perturbation is seeded by (seed, epoch, index)."""

    def __init__(self, corpus, config: PARConfig):
        super().__init__(corpus, config.seed)
        self.config = config

    def __getitem__(self, index: int):
        image, caption = super().__getitem__(index)
        generator = torch.Generator().manual_seed(((self.seed * 100_019 + self.epoch) * 10_000_079 + index) % 2**63)
        return perturb(image, generator, self.config), caption


def capped(distance: torch.Tensor, tau: float) -> torch.Tensor:
    """``distance`` (a scalar) while it is at most ``tau``, else 0 (no repulsion, no gradient)."""
    return torch.where(distance > tau, torch.zeros_like(distance), distance)


class _PARTask(nn.Module):
    """PAR's loss on a batch ``(perturbed images (B, 3, H, W), token ids (B, L))``.

    Under DDP each process encodes its slice of the batch; the CLIP loss and both distances are
    taken over the whole batch (:func:`~clipguard.distributed.gather_batch`)."""

    def __init__(self, clip: ClipModel, frozen: ClipModel, config: PARConfig):
        super().__init__()
        self.clip, self.frozen, self.config = clip, frozen, config

    def forward(self, batch) -> torch.Tensor:
        images, tokens = batch
        unique_tokens, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        image_features = self.clip.encode_image(images, normalize=True)  # (b, D)
        text_features = self.clip.encode_text(unique_tokens, normalize=True)[inverse]  # (b, D)
        with torch.no_grad():
            frozen_image = self.frozen.encode_image(images, normalize=True)
            frozen_text = self.frozen.encode_text(unique_tokens, normalize=True)[inverse]
        _, caption_ids = torch.unique(gather_batch(tokens), dim=0, return_inverse=True)  # (B,)
        image_all, text_all = gather_batch(image_features), gather_batch(text_features)
        loss = clip_contrastive_loss(image_all, text_all, self.clip.logit_scale.detach(), caption_ids)
        d_image = (image_all - gather_batch(frozen_image)).pow(2).sum(-1).mean()
        d_text = (text_all - gather_batch(frozen_text)).pow(2).sum(-1).mean()
        return loss - self.config.repel_weight * (capped(d_image, self.config.tau) + capped(d_text, self.config.tau))


def par_finetune(clip: ClipModel, config: PARConfig | None = None, class_names: Sequence[str] | None = None,
                 run_dir: str | Path | None = None, resume: bool = False, corpus=None) -> tuple[ClipModel, dict]:
    """PAR of a copy of ``clip`` (never changed) on ``config.pairs`` clean pairs of ``corpus``
    (default: Fashion-MNIST's train split). Returns the cleaned model (eval mode) and its stats."""
    config = config or PARConfig()
    start = time.perf_counter()
    pairs = PerturbedPairs(sample_pairs(config, class_names, corpus), config)
    frozen = copy.deepcopy(clip).eval()
    frozen.requires_grad_(False)
    return finetune_on_pairs(clip, config, pairs, lambda tuned: _PARTask(tuned, frozen, config), caption_collate,
                             start, run_dir, resume)


@register
class PAR(WeightFinetune):
    """PAR: the CLIP loss on perturbed clean pairs, repelled from the frozen suspect (module docstring)."""

    name = "par"
    config_class = PARConfig

    @staticmethod
    def finetune(clip: ClipModel, config, class_names, corpus) -> tuple[ClipModel, dict]:
        return par_finetune(clip, config, class_names, corpus=corpus)
