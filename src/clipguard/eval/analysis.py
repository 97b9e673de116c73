"""Perturbation-resistivity (PR) analysis and t-SNE views of a model with and without defenses.

PR (RVPT paper, docs/methods.md, metrics): per vision layer, the mean cosine between an image's
[CLS] state and that of a perturbed copy, for Gaussian noise (std 0.001), a 3x3 blur, colour
jitter, a horizontal flip, and the attack's trigger.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision.transforms.functional as TF

from clipguard.eval.metrics import perturbation_resistivity
from clipguard.eval.plots import plt, save_figure

Perturbation = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, 3, H, W), [0, 1]


def gaussian_noise(images: torch.Tensor, std: float = 0.001, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images + noise.to(images.device)).clamp(0, 1)


def blur(images: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    return TF.gaussian_blur(images, kernel_size=kernel)


def colour_jitter(images: torch.Tensor, strength: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors drawn in [1 - s, 1 + s] (seeded)."""
    g = torch.Generator().manual_seed(seed)
    factors = (1 + strength * (2 * torch.rand(len(images), 3, generator=g) - 1)).tolist()
    out = [TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
           for x, (b, c, s) in zip(images, factors)]
    return torch.stack(out).clamp(0, 1)


def horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def perturbations(trigger=None, seed: int = 0) -> dict[str, Perturbation]:
    """The PR perturbations of docs/methods.md, metrics, the trigger last when given."""
    named: dict[str, Perturbation] = {
        "noise": lambda x: gaussian_noise(x, seed=seed),
        "blur": blur,
        "jitter": lambda x: colour_jitter(x, seed=seed),
        "flip": horizontal_flip,
    }
    if trigger is not None:
        named["trigger"] = lambda x: trigger(x.clone())
    return named


@torch.inference_mode()
def resistivity(model, images: torch.Tensor, named: dict[str, Perturbation]) -> dict[str, list[float]]:
    """PR per layer of ``model`` (a DefendedClip) for each perturbation: name -> [n_layers]."""
    clean = model.cls_states(images.to(model.device)).float()
    return {name: perturbation_resistivity(clean, model.cls_states(perturb(images).to(model.device)).float()).tolist()
            for name, perturb in named.items()}


def plot_resistivity(results: dict[str, dict[str, list[float]]], path) -> None:
    """One panel per perturbation; one line per model (e.g. backdoored, VPT, RVPT)."""
    names = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True)
    for ax, name in zip(list(axes) if len(names) > 1 else [axes], names):
        for label, by_name in results.items():
            values = by_name[name]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("vision block")
        ax.grid(alpha=0.3)
    (axes[0] if len(names) > 1 else axes).set_ylabel("PR (mean cosine, higher = more resistant)")
    (axes[-1] if len(names) > 1 else axes).legend(fontsize=8)
    save_figure(fig, path)


@torch.inference_mode()
def plot_tsne(models: dict[str, object], clean: torch.Tensor, labels: torch.Tensor, triggered: torch.Tensor,
              class_names, path, seed: int = 0) -> None:
    """t-SNE of clean (dots, coloured by class) and triggered (stars) image features per model."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4))
    axes = list(axes) if len(models) > 1 else [axes]
    for ax, (label, model) in zip(axes, models.items()):
        feats = torch.cat([model.encode_image(clean.to(model.device)), model.encode_image(triggered.to(model.device))])
        points = TSNE(n_components=2, random_state=seed, init="pca", perplexity=30).fit_transform(feats.float().cpu().numpy())
        n = len(clean)
        ax.scatter(points[:n, 0], points[:n, 1], c=labels.numpy(), cmap="tab10", s=6)
        ax.scatter(points[n:, 0], points[n:, 1], c=labels.numpy(), cmap="tab10", s=30, marker="*", edgecolors="k",
                   linewidths=0.3)
        ax.set_title(f"{label}: dots clean, stars triggered", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=plt.cm.tab10(i / 9), label=n) for i, n in enumerate(class_names)]
    axes[-1].legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)
