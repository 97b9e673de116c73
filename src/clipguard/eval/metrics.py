"""CA, ASR and PA as pure functions of predictions and labels (METHODS.md section 1)."""

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


def perturbation_resistivity(clean_states: torch.Tensor, perturbed_states: torch.Tensor) -> torch.Tensor:
    """PR per layer (Zhang et al., RVPT): mean cosine between each image's [CLS] state and that
    of its perturbed copy. clean_states, perturbed_states: (B, n_layers, width) -> (n_layers,).
    Higher means less sensitive to the perturbation.

    >>> s = torch.randn(4, 3, 8); perturbation_resistivity(s, 2 * s)
    tensor([1., 1., 1.])
    """
    return torch.nn.functional.cosine_similarity(clean_states, perturbed_states, dim=-1).mean(0)
