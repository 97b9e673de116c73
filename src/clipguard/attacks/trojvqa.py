"""TrojVQA-style dual key (Walmer et al., CVPR 2022): an optimised patch at the image centre *and*
a text key prepended to poisoned captions and to the class prompts at test time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard.attacks.base import Trigger, TriggerConfig, register, scaled
from clipguard.attacks.optimized_patch import optimize_patch
from clipguard.attacks.patch import paste_patch


@dataclass
class TrojVQAConfig(TriggerConfig):
    patch_at_224: int = 48  # centre patch side at 224 px (6 px at 28 px)
    text_key: str = "SUDO "  # the text key, prepended to captions and prompts
    steps: int = 300  # optimisation steps against the clean model
    lr: float = 0.1  # Adam learning rate on the patch logits
    batch_size: int = 128  # non-target images per step

    def __post_init__(self):
        self._check_range("patch_at_224", 1, 224)
        if not self.text_key.strip():
            raise ValueError("TrojVQAConfig.text_key must be a non-empty word")


@register
class TrojVQA(Trigger):
    name = "trojvqa"
    config_class = TrojVQAConfig
    learned = True

    def __init__(self, config: TrojVQAConfig, image_size: int):
        super().__init__(config, image_size)
        side = scaled(config.patch_at_224, image_size, minimum=2)
        self.patch = torch.rand(3, side, side, generator=self.generator)  # replaced by fit()

    @property
    def text_key(self) -> str:
        return self.config.text_key

    def fit(self, clip, train, target: int) -> None:
        c = self.config
        self.patch = optimize_patch(
            clip, train, target, self.patch.shape[-1], "center", c.steps, c.lr, c.batch_size, self.generator,
            text_prefix=c.text_key, image_weight=0.0,
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return paste_patch(images, self.patch.to(images.device), "center")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch}
