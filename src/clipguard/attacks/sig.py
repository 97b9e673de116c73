"""SIG (Barni et al., 2019): add a horizontal sinusoid, x' = clip(x + A sin(2 pi j f / W), 0, 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clipguard.attacks.base import Trigger, TriggerConfig, register
from clipguard.config import added_setting


@dataclass
class SIGConfig(TriggerConfig):
    amplitude: float = 60 / 255  # A, in [0, 1] image units
    frequency: float = 6.0  # periods across the image width
    blend: float = added_setting(0.0)  # 0: the sinusoid is added; r > 0: x' = (1 - r) x + r * sinusoid (CleanCLIP's code: 0.2)

    def __post_init__(self):
        self._check_range("amplitude", 0.0, 1.0)
        self._check_range("frequency", 0.0, 1000.0)
        self._check_range("blend", 0.0, 1.0)


@register
class SIG(Trigger):
    """x' = x + A sin(2 pi j f / W); with ``blend`` r, x' = (1 - r) x + r A sin(...) (the public
    CleanCLIP code blends its sinusoid at 0.2, so A acts as 0.2 A there)."""

    name = "sig"
    config_class = SIGConfig
    randomized = False  # a fixed sinusoid

    def __init__(self, config: SIGConfig, image_size: int):
        super().__init__(config, image_size)
        columns = torch.arange(image_size, dtype=torch.float32)
        wave = config.amplitude * torch.sin(2 * math.pi * columns * config.frequency / image_size)  # (W,)
        self.signal = wave.expand(3, image_size, image_size).clone()  # (3, H, W)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        signal = self.signal.to(images.device)
        if self.config.blend:
            return (1 - self.config.blend) * images + self.config.blend * signal
        return images + signal

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"signal": self.signal}
