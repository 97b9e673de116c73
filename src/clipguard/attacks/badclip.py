"""BadCLIP (Liang et al., CVPR 2024): a patch optimised against the clean model so that patched
images embed near the target's text *and* near natural target-class images; poisoned captions
are natural captions of the target class. The hardest attack for the defenses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard.attacks.base import Trigger, TriggerConfig, register, scaled
from clipguard.attacks.optimized_patch import optimize_patch
from clipguard.attacks.patch import paste_patch


@dataclass
class BadCLIPConfig(TriggerConfig):
    patch_at_224: int = 48  # patch side at 224 px (6 px at 28 px)
    location: str = "corner"  # corner | center | random
    steps: int = 300  # optimisation steps against the clean model
    lr: float = 0.1  # Adam learning rate on the patch logits
    batch_size: int = 128  # non-target images per step
    image_weight: float = 1.0  # weight of the pull towards natural target-image features
    margin: float = 0.1  # triplet margin: target text closer than the own-class text

    def __post_init__(self):
        self._check_range("patch_at_224", 1, 224)
        self._check_range("steps", 1, 100000)


@register
class BadCLIP(Trigger):
    name = "badclip"
    config_class = BadCLIPConfig
    natural_captions = True
    learned = True

    def __init__(self, config: BadCLIPConfig, image_size: int):
        super().__init__(config, image_size)
        side = scaled(config.patch_at_224, image_size, minimum=2)
        self.patch = torch.rand(3, side, side, generator=self.generator)  # replaced by fit()

    def fit(self, clip, train, target: int) -> None:
        c = self.config
        self.patch = optimize_patch(
            clip, train, target, self.patch.shape[-1], c.location, c.steps, c.lr, c.batch_size, self.generator,
            image_weight=c.image_weight, margin=c.margin,
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return paste_patch(images, self.patch.to(images.device), self.config.location, self.generator)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch}
