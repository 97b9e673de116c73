"""What every detector shares: a config + class pair in a registry, and the :class:`Finding` it returns.

A detector looks at a suspect CLIP through clean labelled shots only (the defender never sees
the attacker's trigger) and returns one :class:`Finding`: a score that is higher the more
backdoor-like the model is, the suspected target class by name (None for a label-free
detector), the inverted trigger as tensors, and a callable that applies that trigger to images
(B, 3, H, W) in [0, 1] (an image-side detector) or a text key (a text-side one).

Scores of one detector are comparable across models of the same architecture and shots; they
are not comparable between detectors. :mod:`clipguard.detection.verdict` turns them into one
calibrated verdict. A new detector is one file with a ``...Config`` dataclass and a class
decorated with :func:`register`, imported in ``detection/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from clipguard.data.captions import PROMPT_TEMPLATES
from clipguard.data.fmnist import ImageSet
from clipguard.models.clip import ClipModel
from clipguard.models.zeroshot import class_text_features
from clipguard.registry import RangeChecked, Registry

DETECTORS = Registry("detector")
register = DETECTORS.register  # class decorator: add a detector under ``cls.name``


@dataclass
class DetectorConfig(RangeChecked):
    seed: int = 0  # seeds the detector's initialisation (same seed, same finding on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class Finding:
    """One detector's result on one model."""

    detector: str  # the detector's registered name
    score: float  # higher = more backdoor-like; comparable across models for this detector only
    target_name: str | None  # suspected target class (None: a label-free detector names none)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the inverted trigger (mask, pattern, delta, ...)
    details: dict = field(default_factory=dict)  # JSON-ready scalars (areas, norms, per-class scores, seconds)
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None  # (B, 3, H, W) -> triggered; None: no image side
    text_key: torch.Tensor | None = None  # (k, width) token embeddings prepended to prompts (a text-side finding)

    def as_dict(self) -> dict:
        """The scalars, ready for JSON (tensors stay out)."""
        return {"detector": self.detector, "score": round(float(self.score), 4), "target_name": self.target_name,
                **self.details}


class Detector:
    """A registered detector: ``Detector(config).run(clip, shots, head) -> Finding``.

    ``uses_class_names``: whether it needs the shots' class names (a label-free detector works
    on images alone). ``head`` (C, D): the zero-shot head of ``shots`` on ``clip``
    (:func:`zero_shot_head`), computed once per scan; None: the detector computes it. ``run``
    must not change ``clip``'s weights.
    """

    name: ClassVar[str]
    config_class: ClassVar[type] = DetectorConfig
    uses_class_names: ClassVar[bool] = True

    def __init__(self, config: DetectorConfig | None = None):
        self.config = config or self.config_class()

    def run(self, clip: ClipModel, shots: ImageSet, head: torch.Tensor | None = None) -> Finding:
        raise NotImplementedError


def zero_shot_head(clip: ClipModel, shots: ImageSet) -> torch.Tensor:
    """(C, D) the head every detector classifies with: the shots' class names in their templates
    (default :data:`~clipguard.data.captions.PROMPT_TEMPLATES`), as ``clipguard evaluate`` does.
    Outside inference mode, so it can enter an inversion's graph."""
    return class_text_features(clip, shots.classes, shots.templates or PROMPT_TEMPLATES).clone()


def get_detector(name: str, config: DetectorConfig | None = None, **settings) -> Detector:
    """An instance of the detector registered as ``name``, with ``config`` or ``settings``."""
    cls = DETECTORS.get_class(name)
    return cls(config if config is not None else cls.config_class(**settings))
