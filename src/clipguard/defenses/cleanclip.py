"""CleanCLIP (Bansal et al., "CleanCLIP: Mitigating Data Poisoning Attacks in Multimodal
Contrastive Learning", ICCV 2023) and plain contrastive fine-tuning (FT): docs/methods.md, baselines.

The defender fine-tunes the whole suspect CLIP on clean image-caption pairs with

    L = L_CLIP(I, T) + lambda * (L_II(I, I~) + L_TT(T, T~)) / 2

L_CLIP is CLIP's symmetric InfoNCE (:func:`clipguard.losses.clip_contrastive_loss`); the
unimodal terms are the same InfoNCE *within* one modality, between each image I and an
augmented view I~ of it, and between each caption T and an augmented caption T~. As in
CleanCLIP's reference code, the plain sample is contrasted with one augmented view at CLIP's
logit scale and the two in-modal terms are averaged; that code takes each in-modal
cross-entropy in one direction, we make it symmetric like L_CLIP. Learning each modality on its own
breaks the trigger -> target-text shortcut the poisoned pairs taught. FT is the same with
lambda = 0 (no views are made at all).

Our choices for Fashion-MNIST-sized data:
- Clean pairs: a seeded sample of the corpus (``--captions``; default the Fashion-MNIST train split with the project's training
  captions (:func:`clipguard.data.captions.training_caption`), redrawn every epoch. The sample
  is seeded apart from the attacker's, which also draws from the train split
  (:func:`clipguard.defenses.weights.sample_pairs`).
- Views (:mod:`clipguard.defenses.augment`): an image view (crop, flip, jitter at
  ``augment_strength``) and a caption view per pair, seeded per (seed, epoch, index).

Shapes: images and their views (B, 3, H, W) in [0, 1]; image, text and view features (B, D),
L2-normalised; caption ids (B,).

Deviation: the in-modal terms are symmetric like L_CLIP (the reference code takes one direction).
Deviation: on labelled pairs a caption view is another training caption of the same image, not
EDA; on a user's caption corpus it is EDA's deletion and swap (:func:`~clipguard.defenses.augment.eda_caption`).
Deviation: lr 3e-4 instead of the paper's 5e-6, for only 1,000 clean pairs (docs/results/baselines.md).
Numbers: docs/results/baselines.md.

Example:
    >>> tuned, stats = cleanclip_finetune(clip, CleanCLIPConfig(pairs=1000, epochs=10))
    >>> stats["method"], stats["steps"]
    ('cleanclip', 150)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import nn

from clipguard import ClipguardError
from clipguard.defenses.augment import CleanPairs
from clipguard.defenses.base import register
from clipguard.defenses.weights import WeightFinetune, WeightFinetuneConfig, finetune_on_pairs, sample_pairs
from clipguard.distributed import gather_batch
from clipguard.losses import clip_contrastive_loss
from clipguard.models.clip import ClipModel


@dataclass
class CleanCLIPConfig(WeightFinetuneConfig):
    epochs: int = 10  # passes over the pairs (paper: 10)
    lr: float = 3e-4  # AdamW peak learning rate, cosine decay (paper: 5e-6 at CC3M scale; docs/results/baselines.md)
    lambda_: float = 1.0  # weight of the unimodal (image-image + text-text) terms; 0 = plain FT
    augment_strength: float = 1.0  # image-view strength: 0 = none, 1 = crop 50-100 %, flip, +-40 % jitter
    seed: int = 0  # seeds the pair sample, captions, views, batch order and the fine-tune
    device: str = "auto"  # auto | cpu | cuda

    method: ClassVar[str] = "cleanclip"

    def __post_init__(self):
        super().__post_init__()
        self._check_range("batch_size", 1, 10**6)
        self._check_range("lambda_", 0.0, 1000.0)
        self._check_range("augment_strength", 0.0, 1.0)
        if not self.lr > 0:
            raise ValueError(f"{type(self).__name__}.lr must be > 0, got {self.lr}")


@dataclass
class FinetuneConfig(CleanCLIPConfig):
    """Plain contrastive fine-tuning on clean pairs (FT): CleanCLIP without the unimodal terms."""

    lambda_: float = 0.0  # FT: no unimodal terms

    method: ClassVar[str] = "finetune"

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_ != 0:
            raise ValueError(f"FinetuneConfig.lambda_ must be 0 (cleanclip has the unimodal terms), "
                             f"got {self.lambda_}")


CONFIGS = {cls.method: cls for cls in (CleanCLIPConfig, FinetuneConfig)}


def config_for(method: str) -> CleanCLIPConfig:
    """The default config of ``method`` ("cleanclip" or "finetune")."""
    if method not in CONFIGS:
        raise ClipguardError(f"unknown fine-tuning defense {method!r}; choose one of: {', '.join(CONFIGS)}")
    return CONFIGS[method]()


# ------------------------------------------------------------------------------ losses
def unimodal_contrastive_loss(features: torch.Tensor, views: torch.Tensor, logit_scale: torch.Tensor | float,
                              ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same samples within one modality.

    features, views: (B, D), L2-normalised, row i of each from sample i. ids: (B,), equal
    for samples that are the same (identical captions), which are then positives of each
    other, as in :func:`clip_contrastive_loss`.

    >>> f = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    >>> round(unimodal_contrastive_loss(f, f, 1.0).item(), 4)  # log(1 + 2 / e)
    0.5514
    """
    return clip_contrastive_loss(features, views, logit_scale, ids)


def cleanclip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                   caption_ids: torch.Tensor | None = None, image_views: torch.Tensor | None = None,
                   text_views: torch.Tensor | None = None, lambda_: float = 1.0) -> torch.Tensor:
    """L_CLIP + lambda * (L_II + L_TT) / 2. All features (B, D), L2-normalised; caption_ids (B,)
    marks identical captions. Without views (or with lambda 0) this is L_CLIP alone (FT)."""
    loss = clip_contrastive_loss(image_features, text_features, logit_scale, caption_ids)
    if lambda_ and image_views is not None and text_views is not None:
        in_modal = (unimodal_contrastive_loss(image_features, image_views, logit_scale)
                    + unimodal_contrastive_loss(text_features, text_views, logit_scale, caption_ids))
        loss = loss + lambda_ * 0.5 * in_modal
    return loss


# ------------------------------------------------------------------------- the fine-tune
def _collate(clip: ClipModel):
    """Stack images (and views), tokenise captions (and caption views)."""

    def collate(items):
        columns = list(zip(*items))
        batch = [torch.stack(columns[0]), clip.tokenize(columns[1])]
        if len(columns) == 4:
            batch += [torch.stack(columns[2]), clip.tokenize(columns[3])]
        return tuple(batch)

    return collate


class _CleanCLIPTask(nn.Module):
    """The loss of one batch ``(images, tokens[, image views, caption-view tokens])`` for the engine."""

    def __init__(self, clip: ClipModel, lambda_: float):
        super().__init__()
        self.clip, self.lambda_ = clip, lambda_

    def forward(self, batch) -> torch.Tensor:
        images, tokens = batch[0], batch[1]
        n = len(images)
        if len(batch) == 4:  # one image and one text pass for both views
            images, tokens = torch.cat([images, batch[2]]), torch.cat([tokens, batch[3]])
        image_features = self.clip.encode_image(images, normalize=True)  # (n or 2n, D)
        # identical captions are frequent here: encode each once
        unique_tokens, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        text_features = self.clip.encode_text(unique_tokens, normalize=True)[inverse]  # (n or 2n, D)
        # under DDP each process encoded its slice (n rows) of the batch: every term is taken over
        # the whole batch (gather_batch), with caption ids that match across processes
        _, caption_ids = torch.unique(gather_batch(batch[1]), dim=0, return_inverse=True)  # (N,)
        views = ((gather_batch(image_features[n:]), gather_batch(text_features[n:])) if len(batch) == 4
                 else (None, None))
        return cleanclip_loss(gather_batch(image_features[:n]), gather_batch(text_features[:n]), self.clip.logit_scale,
                              caption_ids, *views, lambda_=self.lambda_)


def clean_pairs(config: CleanCLIPConfig, class_names: Sequence[str] | None = None, corpus=None) -> CleanPairs:
    """The defender's clean pairs (:func:`~clipguard.defenses.weights.sample_pairs` of ``corpus``),
    with views only when lambda_ > 0."""
    pool = sample_pairs(config, class_names, corpus)
    return CleanPairs(pool, config.seed, config.augment_strength if config.lambda_ > 0 else None)


def cleanclip_finetune(clip: ClipModel, config: CleanCLIPConfig | None = None,
                       class_names: Sequence[str] | None = None, run_dir: str | Path | None = None,
                       resume: bool = False, corpus=None) -> tuple[ClipModel, dict]:
    """CleanCLIP (or FT, with a :class:`FinetuneConfig`) of a copy of ``clip``.

    ``clip`` is not modified. ``corpus``: the clean pairs' corpus (:mod:`clipguard.data.pairs`;
    default Fashion-MNIST's train split); ``class_names`` are the names a labelled corpus's
    captions use (default: its own). ``run_dir``/``resume``: the engine's
    checkpoint. Returns the fine-tuned model (eval mode, ``requires_grad`` False) and stats:
    seconds, steps, last_loss, peak_memory_mb, trainable_parameters, pairs, method.
    """
    config = config or CleanCLIPConfig()
    start = time.perf_counter()
    pairs = clean_pairs(config, class_names, corpus)
    tuned, stats = finetune_on_pairs(clip, config, pairs, lambda tuned: _CleanCLIPTask(tuned, config.lambda_), _collate,
                                     start, run_dir, resume)
    stats["clip_parameters"] = sum(p.numel() for p in tuned.parameters())
    return tuned, stats


@register
class CleanCLIP(WeightFinetune):
    """CleanCLIP: the CLIP loss plus in-modal self-supervision on clean pairs (see the module docstring)."""

    name = "cleanclip"
    config_class = CleanCLIPConfig

    @staticmethod
    def finetune(clip: ClipModel, config, class_names, corpus) -> tuple[ClipModel, dict]:
        return cleanclip_finetune(clip, config, class_names, corpus=corpus)


@register
class Finetune(CleanCLIP):
    """Plain contrastive fine-tuning on clean pairs (CleanCLIP with lambda = 0)."""

    name = "finetune"
    config_class = FinetuneConfig
