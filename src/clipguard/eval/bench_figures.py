"""The bench report's figures: the trigger grid, and per attack the PR curves (perturbation
resistivity per layer, docs/methods.md) of the suspect and its prompt defenses on a seeded
sample of test images outside the target class.

The bench loads the models, defenses and triggers (this module is below ``defenses``) and hands
them over; everything here only draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from clipguard.data.classes import class_index
from clipguard.eval.analysis import perturbations, plot_resistivity, resistivity
from clipguard.eval.plots import example_index, plot_trigger_grid
from clipguard.models.view import DefendedClip

TRIGGERS_PNG = "triggers.png"


def pr_sample(labels: torch.Tensor, target: int, images: int, seed: int) -> torch.Tensor:
    """Positions of ``images`` test images outside class ``target``, drawn with ``seed`` (a
    generator of their own: the global random state is not touched)."""
    keep = torch.nonzero(labels != target).flatten()
    return keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:images]]


def write_figures(out: Path, test, triggers: Sequence, targets: dict[str, str], seed: int, pr_images: int = 0,
                  load_attack: Callable[[str], tuple[dict[str, DefendedClip], object]] | None = None) -> list[str]:
    """Write ``triggers.png`` (a seeded test image outside the first attack's target class under each
    of ``triggers``) and, with ``pr_images`` > 0 and ``load_attack``, ``pr-{attack}.png`` for each
    attack of ``targets`` (attack -> target class name); ``load_attack(attack)`` gives
    (label -> view, the attack's trigger), loaded one attack at a time. Returns the file names."""
    first = next(iter(targets))
    plot_trigger_grid(test.float_images(example_index(test, class_index(test.classes, targets[first]), seed)),
                      list(triggers), out / TRIGGERS_PNG)
    names = [TRIGGERS_PNG]
    if load_attack is None or pr_images < 1:
        return names
    for attack, target in targets.items():
        images = test.float_images(pr_sample(test.labels, class_index(test.classes, target), pr_images, seed))
        views, trigger = load_attack(attack)
        results = {label: resistivity(view, images, perturbations(trigger, seed)) for label, view in views.items()}
        plot_resistivity(results, out / f"pr-{attack}.png")
        names.append(f"pr-{attack}.png")
    return names
