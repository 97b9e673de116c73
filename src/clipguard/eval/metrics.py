"""CA, ASR and PA as pure functions of predictions and labels (docs/methods.md, metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TARGET_EXCLUSION_NOTE = "ASR and PA count triggered images of non-target classes only (target-class images excluded)"


@dataclass(frozen=True)
class Rate:
    """``hits`` out of ``total``; ``value`` is their ratio (nan when total is 0)."""

    hits: int
    total: int

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def as_dict(self, hits_name: str = "hits") -> dict:
        return {"value": self.value, hits_name: self.hits, "total": self.total}

    def __str__(self) -> str:
        return f"{100 * self.value:.2f}% ({self.hits}/{self.total})"


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> Rate:
    """Top-1 accuracy. predictions, labels: (N,) int64.

    >>> clean_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])).hits
    2
    """
    return Rate(int((predictions == labels).sum()), len(labels))


def attack_success_rate(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> Rate:
    """Fraction of triggered images *of non-target classes* predicted as ``target``.

    predictions: (N,) on triggered images; labels: (N,) their true classes.

    >>> attack_success_rate(torch.tensor([2, 2, 2]), torch.tensor([0, 1, 2]), target=2)
    Rate(hits=2, total=2)
    """
    keep = labels != target
    return Rate(int((predictions[keep] == target).sum()), int(keep.sum()))


def poisoned_accuracy(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> Rate:
    """Accuracy w.r.t. the true label on the same triggered non-target images as the ASR."""
    keep = labels != target
    return Rate(int((predictions[keep] == labels[keep]).sum()), int(keep.sum()))


AT_CHANCE = 1.5  # CA at or below this many times chance (1 / classes) counts as "at chance"


def chance_warning(accuracy: float, classes: int) -> str | None:
    """A warning when clean accuracy ``accuracy`` (0-1) is at chance for ``classes`` classes, else None.

    A broken model (NaN weights, a diverged defense) predicts one class or noise: its CA sits at
    1 / classes and its ASR reads 0 %, which would look like a perfect defense.

    >>> chance_warning(0.1026, 10)
    'CA 10.3% is at chance (10.0% for 10 classes): the model is broken and its ASR means nothing'
    >>> chance_warning(0.85, 10) is None
    True
    """
    if classes < 2 or accuracy != accuracy or accuracy > AT_CHANCE / classes:
        return None
    return (f"CA {100 * accuracy:.1f}% is at chance ({100 / classes:.1f}% for {classes} classes): "
            "the model is broken and its ASR means nothing")


def perturbation_resistivity(clean_states: torch.Tensor, perturbed_states: torch.Tensor) -> torch.Tensor:
    """PR per layer (Zhang et al., RVPT): mean cosine between each image's [CLS] state and that
    of its perturbed copy. clean_states, perturbed_states: (B, n_layers, width) -> (n_layers,).
    Higher means less sensitive to the perturbation.

    >>> s = torch.randn(4, 3, 8); perturbation_resistivity(s, 2 * s)
    tensor([1., 1., 1.])
    """
    return torch.nn.functional.cosine_similarity(clean_states, perturbed_states, dim=-1).mean(0)
