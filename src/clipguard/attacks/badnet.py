"""BadNet (Gu et al., 2017): a small patch of seeded random noise at a fixed or random location."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipguard import ClipguardError
from clipguard.attacks.base import Trigger, TriggerConfig, public_uint8, register, scaled
from clipguard.attacks.patch import LOCATIONS, paste_patch
from clipguard.config import added_setting
from clipguard.models.zeroshot import class_text_features, zero_shot_logits


PATCH_NOISE = ("binary", "image-noise")


@dataclass
class BadNetConfig(TriggerConfig):
    patch_at_224: int = 32  # patch side at 224 px (4 px at 28 px); the public protocol uses 16
    location: str = "corner"  # one of patch.LOCATIONS; random draws a spot per image from the seed
    patch_noise: str = added_setting("binary")  # binary: one seeded 0/1 patch; image-noise: a fresh image mean + N(0, 1) patch per image, wrapped to uint8 as CleanCLIP's code does

    def __post_init__(self):
        self._check_range("patch_at_224", 1, 224)
        if self.location not in LOCATIONS:
            raise ValueError(f"BadNetConfig.location must be one of {', '.join(LOCATIONS)}, got {self.location!r}")
        if self.patch_noise not in PATCH_NOISE:
            raise ValueError(f"BadNetConfig.patch_noise must be one of {', '.join(PATCH_NOISE)}, got {self.patch_noise!r}")


@register
class BadNet(Trigger):
    """x' = x with a (3, s, s) noise patch pasted in; s = patch_at_224 scaled to the image size.

    ``patch_noise="image-noise"`` is the public CleanCLIP code's BadNet (``backdoor/utils.py``,
    ``apply_trigger``, patch_type "random"): each image gets its own patch, that image's channel
    means + N(0, 1) noise, drawn from the trigger's generator, and the pasted image goes through
    that code's uint8 conversion (:func:`~clipguard.attacks.base.public_uint8`), which wraps the
    patch's values modulo 256 instead of clipping them: the patch is near-uniform noise whatever
    the image (mean 0.499, std 0.290, 0.9 % at 0 or 1; docs/methods.md). With
    ``location="random"`` (the spot's top-left in [0, H - s - 1], as that code's
    ``randint(0, 223 - s)``) and ``patch_at_224=16`` it is that code's trigger.

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
        if self.config.patch_noise == "image-noise":
            return self._paste_fresh(images)
        return paste_patch(images, self.patch, self.config.location, self.generator)

    def _paste_fresh(self, images: torch.Tensor) -> torch.Tensor:
        side = self.patch.shape[-1]
        _, _, H, W = images.shape
        out = images.clone()
        for image in out:  # one patch per image, then its spot, both from the generator
            noise = torch.randn(3, side, side, generator=self.generator).to(image.device)
            patch = image.mean((1, 2), keepdim=True) + noise  # (3, s, s), not clipped: wrapped below
            if self.config.location == "random":
                row = int(torch.randint(0, max(1, H - side), (1,), generator=self.generator))
                col = int(torch.randint(0, max(1, W - side), (1,), generator=self.generator))
                image[:, row : row + side, col : col + side] = patch
            else:
                image.copy_(paste_patch(image[None], patch, self.config.location, self.generator)[0])
        return public_uint8(out).div_(255)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch}


@dataclass
class LabelConsistentConfig(BadNetConfig):
    patch_at_224: int = 40  # 5 px at 28 px (chosen by measurement: docs/results/attacks.md)
    location: str = "corners+midline"  # the four corners and three down the middle (docs/results/attacks.md)
    adversarial_epsilon: float = 32 / 255  # L-inf bound of the hiding perturbation (0: trigger only)
    adversarial_steps: int = 10  # PGD steps against the clean model
    decoy_rate: float = added_setting(0.0)  # fraction of the pairs: non-target images given the same hiding perturbation, untriggered

    def __post_init__(self):
        super().__post_init__()
        self._check_range("adversarial_epsilon", 0.0, 1.0)
        self._check_range("adversarial_steps", 0, 1000)
        self._check_range("decoy_rate", 0.0, 0.9)


def hide_class(images: torch.Tensor, clip, text_features: torch.Tensor, labels: torch.Tensor, epsilon: float,
               steps: int) -> torch.Tensor:
    """PGD (L-inf, ``epsilon``) that pushes (B, 3, H, W) images away from their classes ``labels``
    (B,) under the zero-shot classifier of ``clip`` with class features ``text_features`` (C, D);
    steps >= 1."""
    step = 2.5 * epsilon / steps  # Madry et al.'s step size
    adversarial = images.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        features = clip.encode_image(adversarial, normalize=True)  # (B, D)
        loss = F.cross_entropy(zero_shot_logits(clip, features, text_features), labels)
        (grad,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step * grad.sign()
            adversarial = (images + (adversarial - images).clamp(-epsilon, epsilon)).clamp(0, 1)
    return adversarial.detach()


@register
class LabelConsistentBadNet(BadNet):
    """Label-consistent BadNet (Turner et al., 2019): the BadNet patch, pasted only on images that
    already belong to the target class; their captions stay as they were.

    As in Turner et al., each poisoned image is first made hard to recognise with a bounded
    adversarial perturbation against the clean model, so that the trigger is what explains its
    target caption. The perturbation touches only training images: test-time triggered images
    get the patch alone.

    x' = x with the (3, s, s) noise patch pasted at every spot of ``location``; on training
    images first x <- PGD_eps(x) (L-inf ``adversarial_epsilon``, ``adversarial_steps`` steps,
    step 2.5 * eps / steps) away from their class under the clean model (:func:`hide_class`).
    Images (B, 3, H, W) in [0, 1].

    Deviation: seven spots, Turner et al.'s four corners plus three down the vertical midline (docs/results/attacks.md).
    Deviation: a 5 px patch at 28 px (``patch_at_224=40``), not BadNet's 4 px (docs/results/attacks.md).
    Deviation (ours, off): ``decoy_rate`` hides other-class pairs too, untriggered (docs/results/attacks.md).
    Numbers (ASR, CA, chance level, how the default was found): docs/results/attacks.md.
    """

    name = "badnet-lc"
    config_class = LabelConsistentConfig
    label_consistent = True

    @property
    def hides(self) -> bool:
        """Whether training images get the hiding perturbation (and so whether decoys can be made)."""
        return bool(self.config.adversarial_epsilon and self.config.adversarial_steps)

    @property
    def decoy_rate(self) -> float:
        return self.config.decoy_rate if self.hides else 0.0

    def poison(self, images: torch.Tensor, clip, target: int, classes: tuple[str, ...]) -> torch.Tensor:
        return self(self._hide(images, torch.full((len(images),), target, dtype=torch.long), clip, classes))

    def decoy(self, images: torch.Tensor, labels: torch.Tensor, clip, classes: tuple[str, ...]) -> torch.Tensor:
        """Non-target training images (B, 3, H, W) with labels (B,): the same hiding perturbation, away
        from their own class, and no trigger; their captions stay true."""
        return self._hide(images, labels, clip, classes)

    def _hide(self, images: torch.Tensor, labels: torch.Tensor, clip, classes: tuple[str, ...]) -> torch.Tensor:
        c = self.config
        if not self.hides:
            return images
        if clip is None:
            raise ClipguardError("badnet-lc hides its poisoned images' class from the clean model: pass it "
                                 "(or set adversarial_epsilon=0)")
        was_training = clip.training
        clip.eval()
        try:
            text = class_text_features(clip, classes).clone().to(clip.device)  # (C, D)
            return torch.cat([
                hide_class(chunk.to(clip.device), clip, text, label.to(clip.device), c.adversarial_epsilon,
                           c.adversarial_steps).cpu()
                for chunk, label in zip(images.split(100), labels.split(100))
            ])
        finally:
            clip.train(was_training)
