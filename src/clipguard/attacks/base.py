"""What every attack shares: a config dataclass, a trigger that acts on [0, 1] images, a registry.

A trigger owns only tensors (a patch, a noise image, a warp grid, an encoder's weights). Seeded
triggers rebuild those tensors from their seed; learned ones (BadCLIP, TrojVQA, ISSBA) fit them
against the clean model in :meth:`Trigger.fit`. Either way :meth:`Trigger.state_dict` is saved
beside the backdoored model, so evaluation applies exactly the trigger that was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from clipguard import ClipguardError
from clipguard.registry import RangeChecked, Registry

ATTACKS = Registry("attack")
register = ATTACKS.register  # class decorator: add a trigger under ``cls.name``
get_trigger_class = ATTACKS.get_class


@dataclass
class TriggerConfig(RangeChecked):
    seed: int = 0  # seeds every random element of the trigger


def scaled(pixels_at_224: float, image_size: int, minimum: int = 1) -> int:
    """A size given at CLIP's 224 px, scaled to ``image_size`` (never below ``minimum``)."""
    return max(minimum, round(pixels_at_224 * image_size / 224))


class Trigger:
    """Base class. Subclasses set ``name`` and ``config_class`` and implement :meth:`apply`.

    Class attributes say how the attack poisons captions:
        label_consistent: poison only target-class images and keep their captions.
        natural_captions: poisoned captions describe the target like real captions do
            (BadCLIP) rather than filling prompt templates with the target name.
        text_key: prefix added to poisoned captions and to test prompts (TrojVQA's dual key).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[TriggerConfig]] = TriggerConfig
    label_consistent: ClassVar[bool] = False
    natural_captions: ClassVar[bool] = False
    learned: ClassVar[bool] = False  # needs fit() against a clean model
    randomized: ClassVar[bool] = True  # has random elements, so the seed changes it

    def __init__(self, config: TriggerConfig, image_size: int):
        self.config, self.image_size = config, image_size
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def text_key(self) -> str:
        return ""

    def fit(self, clip, train, target: int) -> None:
        """Optimise learned trigger parameters against the clean ``clip`` (no-op when seeded)."""

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> triggered images, same shape, in [0, 1]."""
        raise NotImplementedError

    def poison(self, images: torch.Tensor, clip, target: int, classes: tuple[str, ...]) -> torch.Tensor:
        """The attacker's poisoned training images (B, 3, H, W): by default just triggered.

        Test-time ASR always uses :meth:`__call__`; an attack may do more to its *training*
        images (label-consistent BadNet first hides their class from the clean ``clip``).
        """
        return self(images)

    @property
    def decoy_rate(self) -> float:
        """Fraction of the pairs the attacker alters without triggering them (:meth:`decoy`); 0: none."""
        return 0.0

    def decoy(self, images: torch.Tensor, labels: torch.Tensor, clip, classes: tuple[str, ...]) -> torch.Tensor:
        """Altered (B, 3, H, W) non-target training images with labels (B,), captions kept, no trigger.

        Only called when :attr:`decoy_rate` > 0 (label-consistent BadNet's hiding decoys).
        """
        raise NotImplementedError(f"{self.name} makes no decoys")

    def __call__(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ClipguardError(
                f"{self.name} trigger was built for {self.image_size} px images, got {tuple(images.shape[-2:])}"
            )
        return self.apply(images).clamp_(0, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trigger's tensors (saved as safetensors beside the backdoored model)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ClipguardError(f"{self.name} trigger state lacks {sorted(missing)}; the model directory is damaged")
        for key, value in state.items():
            setattr(self, key, value.float())


def build_trigger(name: str, image_size: int, **config) -> Trigger:
    """A trigger by registry name with config overrides, e.g. ``build_trigger("blended", 28, seed=1)``."""
    cls = get_trigger_class(name)
    try:
        return cls(cls.config_class(**config), image_size)
    except (TypeError, ValueError) as err:
        raise ClipguardError(f"{name}: {err}") from None
