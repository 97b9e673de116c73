"""BadNet (Gu et al., 2017): a small patch of seeded random noise at a fixed or random location."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard.attacks.base import Trigger, TriggerConfig, register, scaled
from clipguard.attacks.patch import paste_patch


@dataclass
class BadNetConfig(TriggerConfig):
    patch_at_224: int = 32  # patch side at 224 px (4 px at 28 px); the public protocol uses 16
    location: str = "corner"  # corner | center | random (random draws per image from the seed)

    def __post_init__(self):
        self._check_range("patch_at_224", 1, 224)
        if self.location not in ("corner", "center", "random"):
            raise ValueError(f"BadNetConfig.location must be corner, center or random, got {self.location!r}")


@register
class BadNet(Trigger):
    """x' = x with a (3, s, s) noise patch pasted in; s = patch_at_224 scaled to the image size.

    >>> t = BadNet(BadNetConfig(seed=0), image_size=28); t(torch.zeros(2, 3, 28, 28)).shape
    torch.Size([2, 3, 28, 28])
    """

    name = "badnet"
    config_class = BadNetConfig

    def __init__(self, config: BadNetConfig, image_size: int):
        super().__init__(config, image_size)
        side = scaled(config.patch_at_224, image_size, minimum=2)
        # binary noise: high contrast survives the model's normalisation and resizing
        self.patch = torch.randint(0, 2, (3, side, side), generator=self.generator).float()  # (3, s, s)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return paste_patch(images, self.patch, self.config.location, self.generator)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch}


@register
class LabelConsistentBadNet(BadNet):
    """Label-consistent BadNet (Turner et al., 2019): the same patch, pasted only on images that
    already belong to the target class; their captions stay as they were."""

    name = "badnet-lc"
    label_consistent = True
