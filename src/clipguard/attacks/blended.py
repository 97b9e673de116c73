"""Blended (Chen et al., 2017): x' = (1 - ratio) x + ratio n, n a seeded uniform-noise image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard.attacks.base import Trigger, TriggerConfig, register


@dataclass
class BlendedConfig(TriggerConfig):
    ratio: float = 0.2  # weight of the noise image

    def __post_init__(self):
        self._check_range("ratio", 0.0, 1.0)


@register
class Blended(Trigger):
    name = "blended"
    config_class = BlendedConfig

    def __init__(self, config: BlendedConfig, image_size: int):
        super().__init__(config, image_size)
        self.noise = torch.rand(3, image_size, image_size, generator=self.generator)  # (3, H, W)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return (1 - self.config.ratio) * images + self.config.ratio * self.noise

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"noise": self.noise}
