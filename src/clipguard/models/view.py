"""A CLIP seen through a defense: the one interface evaluation, analysis and the bench use.

It lives below ``eval`` and ``defenses`` so that both can use it without importing each other.
A defense here is anything with ``encode_image(clip, images)``, ``class_features(clip, names,
text_prefix, templates)`` and ``cls_states(clip, images)`` (every :class:`clipguard.defenses.Defense`,
and :class:`NoDefense`, the model as it is).
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


class NoDefense:
    """The identity defense: the CLIP's own image features, prompted class features and [CLS]
    states, as they are (what a :class:`DefendedClip` without a defense sees)."""

    name = "none"

    def encode_image(self, clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
        return clip.encode_image(images, normalize=True)

    def class_features(self, clip: ClipModel, class_names: Sequence[str], text_prefix: str = "",
                       templates: Sequence[str] | None = None) -> torch.Tensor:
        return class_text_features(clip, class_names, templates or PROMPT_TEMPLATES, text_prefix)

    def cls_states(self, clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
        return vision_cls_states(clip, images)


class DefendedClip:
    """A CLIP seen through a defense: the interface zero-shot evaluation uses."""

    def __init__(self, clip: ClipModel, defense=None):  # defense: a clipguard.defenses.Defense; None: NoDefense
        self.clip, self.defense = clip, NoDefense() if defense is None else defense

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.defense.encode_image(self.clip, images)

    def class_features(self, class_names: Sequence[str], text_prefix: str = "",
                       templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) class features; ``templates`` (e.g. OpenAI's ImageNet prompts) replace the default ones."""
        return self.defense.class_features(self.clip, class_names, text_prefix, templates)

    def cls_states(self, images: torch.Tensor) -> torch.Tensor:
        return self.defense.cls_states(self.clip, images)
