"""BadNet (Gu et al., 2017): a small patch of seeded random noise at a fixed or random location."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipguard import ClipguardError
from clipguard.attacks.base import Trigger, TriggerConfig, register, scaled
from clipguard.attacks.patch import LOCATIONS, paste_patch
from clipguard.models.zeroshot import class_text_features, zero_shot_logits


@dataclass
class BadNetConfig(TriggerConfig):
    patch_at_224: int = 32  # patch side at 224 px (4 px at 28 px); the public protocol uses 16
    location: str = "corner"  # one of patch.LOCATIONS; random draws a spot per image from the seed

    def __post_init__(self):
        self._check_range("patch_at_224", 1, 224)
        if self.location not in LOCATIONS:
            raise ValueError(f"BadNetConfig.location must be one of {', '.join(LOCATIONS)}, got {self.location!r}")


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


@dataclass
class LabelConsistentConfig(BadNetConfig):
    patch_at_224: int = 40  # 5 px at 28 px: 98.99 % ASR with seven copies, against 89.11 % with 4 px
    location: str = "corners+midline"  # the four corners and three down the middle: 89.11 % against 80.01 %
    adversarial_epsilon: float = 32 / 255  # L-inf bound of the hiding perturbation (0: trigger only)
    adversarial_steps: int = 10  # PGD steps against the clean model
    decoy_rate: float = 0.0  # fraction of the pairs: non-target images given the same hiding perturbation, untriggered

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

    The default trigger is a 5 px patch (``patch_at_224=40``) at seven spots: Turner et al.'s four
    corners plus three down the vertical midline (top, centre, bottom; ``location=
    "corners+midline"``), with the hiding perturbation at 32/255. Measured on the built-in model
    (3 % of 10,000 pairs poisoned, i.e. 300 of the ~1,000 bags; ASR on the 9,000 non-target test
    images; ``clipguard attack --attack badnet-lc --target bag --seed 0``): ASR 98.99 %, CA 89.37
    (seed 1: 97.57 %, CA 89.43); the clean model reads 3.02 % of the triggered non-bag test
    images as bag (chance level), but its PA on them is 58.78 %: the seven patches hide content.

    How it got there (all at 3 %):

    - one 4 px patch at the bottom-right corner: without the perturbation 0.58 % (the model
      matches those images to their captions by their content); epsilon 8/255 8.60 %, 16/255
      25.51 %, 32/255 6.68 % (a strong perturbation becomes the bag cue itself). A 6 px patch
      36.87 %; 6 % / 9 % of the pairs poisoned 48.94 % / 50.36 %; PGD towards a seeded other class
      12.61 %.
    - Turner et al.'s four corners (4 px): 12/255 50.54 %, 16/255 62.16 %, 24/255 75.32 %, 32/255
      80.01 % (CA 89.30), 48/255 75.23 %, 64/255 68.94 %. At 32/255: 30 PGD steps 65.83 %, 6 % of
      the pairs 80.39 %, fine-tune lr 2e-4 82.88 %, batch 64 83.18 %, 10 epochs 84.00 %; targeted
      PGD towards every other class in turn 71.07 %; a grey or a smooth perturbation 62.92 % /
      64.69 %; at reduced training amplitude (the patch blended in at 0.5 / 0.25, full at test)
      72.77 % / 37.33 %.
    - Why it stalled: the trigger was learned together with the hiding noise. Random +-32/255 sign
      noise under the trigger lifted trousers from 17.5 % to 44.0 % and ankle boots from 47.5 % to
      91.0 % (noise alone <= 4.5 %; the same noise confined to the corner tokens: no lift), and
      every other class was >= 96 %. The patch had too little weight to beat confidently
      recognised content it had never been trained against.
    - More copies of the patch give it that weight: four corners and the centre 83.34 %; four
      corners and the vertical midline (seven 4 px copies) 89.11 % (CA 89.32; at 40/255 89.20 %),
      trousers 29.5 %, ankle boots 81.0 %. With 5 px copies: 98.99 % (CA 89.37), the default.
      Copies on the left and right midpoints were not kept: the clean model already reads 42.50 %
      of images with corners + side midpoints as bag, and 76.43 % with all nine spots (wide
      things are bags here), against 2.57 % for the four corners and 2.93 % for the default.
      Whole-token (7 px) corner patches were rejected for the same reason (clean model: 57.11 %).

    ``decoy_rate`` (off by default) also gives that fraction of the pairs, drawn from the other
    classes, the same hiding perturbation away from their own class, untriggered and with true
    captions, so that the perturbation cannot become the bag cue and a stronger one can be used.
    With the four-corner 4 px trigger, 10 % decoys at 48/255 (``--set decoy_rate=0.1 --set
    adversarial_epsilon=0.18823529411764706``) gave 83.99 % (CA 88.10; 75.23 % without decoys);
    with seven 4 px copies at 48/255 89.28 % (CA 88.30), no better than without them, so it stays
    off.
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
