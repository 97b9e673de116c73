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
from clipguard.config import added_setting
from clipguard.registry import RangeChecked, Registry

ATTACKS = Registry("attack")
register = ATTACKS.register  # class decorator: add a trigger under ``cls.name``
get_trigger_class = ATTACKS.get_class


TEST_VIEWS = ("crop", "squash")


@dataclass
class TriggerConfig(RangeChecked):
    seed: int = 0  # seeds every random element of the trigger
    poison_jpeg_quality: int = added_setting(0)  # 0: off; 1-100: poisoned training images go through JPEG at this quality after the trigger (the public code's: 75)
    test_view: str = added_setting("crop")  # triggered test images: crop (as clean ones) or squash (whole frame resized to a square, the public code's)

    def check_steps(self) -> None:
        """Checks of the fields every trigger has (subclasses' ``__post_init__`` checks their own)."""
        self._check_range("poison_jpeg_quality", 0, 100)
        if self.test_view not in TEST_VIEWS:
            raise ValueError(f"{type(self).__name__}.test_view must be one of {', '.join(TEST_VIEWS)}, "
                             f"got {self.test_view!r}")


# The fields above that act around the trigger, not on it: they change no learned fit.
PIPELINE_STEPS = ("poison_jpeg_quality", "test_view")


def public_uint8(images: torch.Tensor) -> torch.Tensor:
    """The float -> uint8 conversion of the public CleanCLIP code, as float values 0..255.

    Its triggers end in torchvision's ``ToPILImage``: ``x.mul(255).byte()`` (now
    ``(x * 255).astype(np.uint8)``). On x86 CPUs both truncate toward zero and then wrap modulo
    256, so values outside [0, 1] come back round rather than clipped: -0.3 -> 180, 1.7 -> 177,
    2.2 -> 49. That cast is undefined in C for out-of-range values; this writes it as
    ``trunc`` then ``remainder``, defined for every float. In [0, 1] it is floor(255 x).
    """
    return images.mul(255).trunc_().remainder_(256)


def jpeg_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> the same image saved as JPEG at ``quality`` and read back (PIL, in
    memory; PIL's default chroma subsampling), as the public code saves its poisoned images."""
    import io

    import numpy as np
    from PIL import Image

    pixels = public_uint8(image.clamp(0, 1)).to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        back = np.asarray(decoded.convert("RGB")).copy()
    return torch.from_numpy(back).permute(2, 0, 1).float().div_(255).to(image.device)


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
    file_settings: ClassVar[tuple[str, ...]] = ()  # config fields naming an input file whose content state_dict() keeps

    def __init__(self, config: TriggerConfig, image_size: int):
        config.check_steps()
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
