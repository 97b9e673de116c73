"""The mask-and-pattern detector: :func:`~clipguard.detection.inversion.detect_backdoor` as a
registered detector (a localised trigger: BadNet-like patches, ISSBA-like noise)."""

from __future__ import annotations

import torch

from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import Detector, Finding, register, zero_shot_head
from clipguard.detection.inversion import InversionConfig, apply_trigger, detect_backdoor
from clipguard.models.clip import ClipModel


@register
class PatchDetector(Detector):
    """Score: the collapse of the best of ``restarts`` contrastive mask-and-pattern inversions,
    i.e. the share of triggered shots of other classes read as the suspected target."""

    name = "patch"
    config_class = InversionConfig

    def run(self, clip: ClipModel, shots: ImageSet, head: torch.Tensor | None = None) -> Finding:
        result = detect_backdoor(clip, shots, self.config, zero_shot_head(clip, shots) if head is None else head)
        mask, pattern = result.mask, result.pattern
        return Finding(
            detector=self.name, score=result.collapse, target_name=result.target_name,
            tensors={"mask": mask, "pattern": pattern},
            details={"collapse": round(result.collapse, 4), "mask_area": round(result.mask_area, 4),
                     "embedding_collapse": round(result.embedding_collapse, 4), "seconds": round(result.seconds, 2)},
            apply=lambda images: apply_trigger(images, mask.to(images.device), pattern.to(images.device)),
        )
