"""Metrics (pure functions), zero-shot evaluation, reports."""

from clipguard.eval.metrics import (
    TARGET_EXCLUSION_NOTE, Rate, attack_success_rate, clean_accuracy, poisoned_accuracy,
)
from clipguard.models.zeroshot import class_text_features, image_features, predict, zero_shot_logits

__all__ = [
    "TARGET_EXCLUSION_NOTE", "Rate", "attack_success_rate", "class_text_features", "clean_accuracy",
    "image_features", "poisoned_accuracy", "predict", "zero_shot_logits",
]
