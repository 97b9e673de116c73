"""What the verdict measures beside the detectors: how far one trigger collapses a model, and the
class bias a model has without any trigger.

Shapes: shots (N, 3, H, W) in [0, 1]; a zero-shot head (C, D); a text key (k, width) of token
embeddings put after the start token of every prompt.
"""

from __future__ import annotations

import torch

from clipguard.data.captions import PROMPT_TEMPLATES
from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import Finding, zero_shot_head
from clipguard.models.clip import ClipModel


def keyed_class_features(clip: ClipModel, classes, key: torch.Tensor, templates=PROMPT_TEMPLATES) -> torch.Tensor:
    """(C, D) class features with the token embeddings ``key`` (k, width) inserted after the start token of every prompt."""
    ids = clip.tokenize([t.format(name) for name in classes for t in templates]).to(clip.device)  # (C * T, L)
    length, k = ids.shape[1], key.shape[0]
    with torch.no_grad():
        embeddings = clip.model.token_embedding(ids)  # (C * T, L, width)
        keyed = torch.cat([embeddings[:, :1], key.to(embeddings).expand(len(ids), -1, -1), embeddings[:, 1:]], 1)
        keyed_ids = torch.cat([ids[:, :1], torch.zeros(len(ids), k, dtype=ids.dtype, device=ids.device), ids[:, 1:]], 1)
        features = clip.encode_text_embeddings(keyed[:, :length], keyed_ids[:, :length])
        features = torch.nn.functional.normalize(features, dim=-1).view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(features, dim=-1)


def collapse_towards(clip: ClipModel, shots: ImageSet, finding: Finding, target: str | None = None,
                     head: torch.Tensor | None = None) -> tuple[str, float]:
    """(target, share of the shots of other classes that ``clip`` reads as it) under the finding's
    trigger; target None: the class most triggered shots are read as. ``head`` (C, D): ``clip``'s
    zero-shot head (:func:`~clipguard.detection.base.zero_shot_head`), computed when None."""
    templates = shots.templates or PROMPT_TEMPLATES
    images = shots.float_images()  # (N, 3, H, W)
    with torch.no_grad():
        if finding.apply is not None:
            images = finding.apply(images)
        texts = (keyed_class_features(clip, shots.classes, finding.text_key, templates) if finding.text_key is not None
                 else zero_shot_head(clip, shots) if head is None else head).to(clip.device)
        predictions = (clip.encode_image(images.to(clip.device), normalize=True) @ texts.T).argmax(-1).cpu()  # (N,)
    index = (int(torch.bincount(predictions, minlength=len(shots.classes)).argmax()) if target is None
             else shots.classes.index(target))
    others = shots.labels != index
    return shots.classes[index], float((predictions[others] == index).float().mean()) if others.any() else 0.0


def natural_rates(clip: ClipModel, shots: ImageSet, targets: list[str], head: torch.Tensor | None = None) -> list[float]:
    """Per target, the share of clean shots of other classes ``clip`` already reads as it (``head``: as in collapse_towards)."""
    with torch.no_grad():
        texts = (zero_shot_head(clip, shots) if head is None else head).to(clip.device)
        predictions = (clip.encode_image(shots.float_images().to(clip.device), normalize=True) @ texts.T).argmax(-1).cpu()
    rates = []
    for name in targets:
        index = shots.classes.index(name)
        others = shots.labels != index
        rates.append(float((predictions[others] == index).float().mean()))
    return rates
