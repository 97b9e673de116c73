"""Linear probe (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, section 3.2; a baseline in docs/methods.md).

A bias-free linear head W (C, D) is trained with cross-entropy on CLIP's frozen, normalised
image features of the defender's few clean labelled shots:

    logits = logit_scale * f @ W.T,   f = encode_image(x) / |encode_image(x)|   # (B, C)

The features are computed once; only W trains, through the shared engine. The head is
returned by :meth:`LinearProbe.class_features` in place of the class text features, so the
project's zero-shot evaluation (``zero_shot_logits`` = logit_scale * features @ W.T, argmax)
scores the probe unchanged. Its rows are not unit-norm: their lengths are learned too.

Closed-set: no zero-shot, text prefix ignored. The probe only knows the classes it was trained
on, and a text key (TrojVQA's "SUDO ") has no way in. The image encoder is untouched, so a
trigger that moves images towards the target's region of feature space still does so: the
baseline shows what the frozen features alone allow.

Shapes: shot features f (N, D), head W (C, D), logits (B, C).

Deviation: bias-free, trained with AdamW (50 epochs, lr 1e-3, zero start) instead of the paper's
L-BFGS logistic regression; how these defaults were chosen: docs/results/baselines.md.

Example:
    >>> probe = LinearProbe(LinearProbeConfig(shots=16), clip, train.classes)
    >>> stats = probe.fit(clip, shots)             # shots: an ImageSet of 16 images per class
    >>> probe.class_features(clip, train.classes).shape
    torch.Size([10, 128])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet
from clipguard.defenses.base import Defense, DefenseConfig, register
from clipguard.engine import TrainConfig, fit
from clipguard.models.zeroshot import image_features
from clipguard.models.clip import ClipModel


@dataclass
class LinearProbeConfig(DefenseConfig):
    epochs: int = 50  # passes over the shots' features (short: the head overfits 16 shots fast)
    lr: float = 1e-3  # AdamW peak learning rate, cosine decay
    weight_decay: float = 1e-4  # decoupled weight decay on the head
    batch_size: int = 32  # features per step (lowered to the number of shots if larger)

    def __post_init__(self):
        self._check_range("shots", 1, 10**6)
        self._check_range("epochs", 1, 10**6)
        self._check_range("batch_size", 1, 10**6)
        self._check_range("weight_decay", 0.0, 10.0)
        if not self.lr > 0:
            raise ValueError(f"LinearProbeConfig.lr must be > 0, got {self.lr}")


def probe_logits(features: torch.Tensor, head: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """(B, D) normalised features, (C, D) head -> (B, C) logits, exactly as evaluation computes them."""
    return logit_scale * features @ head.T


class _ProbeTask(nn.Module):
    """Cross-entropy of the head on a batch ``(features (B, D), labels (B,))`` for the engine."""

    def __init__(self, head: nn.Parameter, logit_scale: float):
        super().__init__()
        self.head, self.logit_scale = head, logit_scale

    def forward(self, batch) -> torch.Tensor:
        features, labels = batch
        return F.cross_entropy(probe_logits(features, self.head, self.logit_scale), labels)


@register
class LinearProbe(Defense):
    """Bias-free linear head on frozen image features (closed-set: no zero-shot, text prefix ignored)."""

    name = "linear-probe"
    config_class = LinearProbeConfig

    def __init__(self, config: LinearProbeConfig, clip: ClipModel, class_names: Sequence[str]):
        super().__init__(config, clip, class_names)
        # zero start: the classical probe, with no trace of the (possibly poisoned) text tower
        dim = getattr(clip.model.visual, "output_dim", None) or clip.embed_dim
        self.head = nn.Parameter(torch.zeros(len(self.class_names), dim))  # (C, D)

    def fit(self, clip: ClipModel, shots: ImageSet) -> dict:
        config = self.config
        start = time.perf_counter()
        clip.requires_grad_(False)
        features = image_features(clip, shots, batch_size=256).cpu().clone()  # (N, D); clone: not an inference tensor
        feature_seconds = time.perf_counter() - start
        dataset = TensorDataset(features, shots.labels)
        train = TrainConfig(epochs=config.epochs, batch_size=min(config.batch_size, len(dataset)), lr=config.lr,
                            weight_decay=config.weight_decay, seed=config.seed, device=config.device, grad_clip=0.0)
        task = _ProbeTask(self.head, float(clip.logit_scale))
        result = fit(task, dataset, train, desc=self.name)
        self.eval()
        with torch.no_grad():
            predictions = probe_logits(features.to(self.head.device), self.head, task.logit_scale).argmax(-1).cpu()
        return {"seconds": round(time.perf_counter() - start, 2), "feature_seconds": round(feature_seconds, 3),
                "steps": result.steps, "last_loss": result.last_loss, "peak_memory_mb": round(result.peak_memory_mb, 1),
                "train_accuracy": round(float((predictions == shots.labels).float().mean()), 4),
                **self.parameter_counts(clip)}

    def class_features(self, clip: ClipModel, class_names: Sequence[str], text_prefix: str = "",
                       templates: Sequence[str] | None = None) -> torch.Tensor:  # a learned head: no templates
        """The head (C, D), rows in ``self.class_names`` order; ``text_prefix`` is ignored."""
        if tuple(class_names) != self.class_names:
            raise ClipguardError(f"the linear probe was trained for classes {list(self.class_names)}, "
                                 f"not {list(class_names)}: it is closed-set")
        return self.head.detach()
