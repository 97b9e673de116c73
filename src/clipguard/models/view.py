"""A CLIP seen through a defense: the one interface evaluation, analysis and the bench use.

It lives below ``eval`` and ``defenses`` so that both can use it without importing each other.
A defense here is anything with ``encode_image(clip, images)``, ``class_features(clip, names,
text_prefix)`` and ``cls_states(clip, images)`` (every :class:`clipguard.defenses.Defense`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from clipguard.data.captions import PROMPT_TEMPLATES
from clipguard.models.clip import ClipModel
from clipguard.models.prompted import run_blocks, vision_stem
from clipguard.models.zeroshot import class_text_features


def vision_cls_states(clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
    """(B, n_blocks, width) [CLS] state after each block of the unprompted vision tower."""
    visual = clip.model.visual
    _, states = run_blocks(visual, vision_stem(visual, clip.preprocess(images)), 0, cls_only=True)
    return torch.stack(states, dim=1)


class DefendedClip:
    """A CLIP seen through a defense: the interface zero-shot evaluation uses."""

    def __init__(self, clip: ClipModel, defense=None):  # defense: a clipguard.defenses.Defense, or None
        self.clip, self.defense = clip, defense

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.defense is None:
            return self.clip.encode_image(images, normalize=True)
        return self.defense.encode_image(self.clip, images)

    def class_features(self, class_names: Sequence[str], text_prefix: str = "",
                       templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) class features; ``templates`` (e.g. OpenAI's ImageNet prompts) replace the default ones."""
        if self.defense is None:
            return class_text_features(self.clip, class_names, templates or PROMPT_TEMPLATES, text_prefix)
        return self.defense.class_features(self.clip, class_names, text_prefix, templates)

    def cls_states(self, images: torch.Tensor) -> torch.Tensor:
        if self.defense is None:
            return vision_cls_states(self.clip, images)
        return self.defense.cls_states(self.clip, images)
