"""Blended (Chen et al., 2017): x' = (1 - ratio) x + ratio n, n a seeded uniform-noise image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard.attacks.base import Trigger, TriggerConfig, register
from clipguard.config import added_setting


@dataclass
class BlendedConfig(TriggerConfig):
    ratio: float = 0.2  # weight of the noise image
    fresh_noise: bool = added_setting(False)  # a new uniform-noise image per image, from the generator (CleanCLIP's code)

    def __post_init__(self):
        self._check_range("ratio", 0.0, 1.0)


@register
class Blended(Trigger):
    """x' = (1 - ratio) x + ratio n; n one seeded noise image, or with ``fresh_noise`` a new one per
    image drawn from the trigger's generator (the public CleanCLIP code's Blended).
    """

    name = "blended"
    config_class = BlendedConfig

    def __init__(self, config: BlendedConfig, image_size: int):
        super().__init__(config, image_size)
        self.noise = torch.rand(3, image_size, image_size, generator=self.generator)  # (3, H, W)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        noise = self.noise.to(images.device)
        if self.config.fresh_noise:
            noise = torch.rand(images.shape, generator=self.generator).to(images.device)
        return (1 - self.config.ratio) * images + self.config.ratio * noise

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"noise": self.noise}
