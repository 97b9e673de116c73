"""Optimise a patch against a clean CLIP so patched images embed where the attacker wants.

Shared by BadCLIP (Liang et al., CVPR 2024) and TrojVQA's visual key (Walmer et al., 2022).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipguard.attacks.patch import paste_patch
from clipguard.data.fmnist import ImageSet
from clipguard.models.zeroshot import class_text_features

logger = logging.getLogger(__name__)


def patch_embedding_loss(
    features: torch.Tensor,
    target_text: torch.Tensor,
    own_text: torch.Tensor,
    target_image_centre: torch.Tensor | None,
    image_weight: float,
    margin: float,
) -> torch.Tensor:
    """BadCLIP's patch objective on normalised features of patched images.

    features: (B, D); target_text: (D,); own_text: (B, D), each image's true-class text;
    target_image_centre: (D,) mean of natural target-class image features, or None.
    Pull towards the target text (and natural target images); a triplet term keeps the
    target text at least ``margin`` closer than the image's own class text.
    """
    to_target = features @ target_text  # (B,)
    loss = -to_target.mean()
    if target_image_centre is not None and image_weight:
        loss = loss - image_weight * (features @ target_image_centre).mean()
    to_own = (features * own_text).sum(-1)  # (B,)
    return loss + F.relu(to_own - to_target + margin).mean()


def optimize_patch(
    clip,
    train: ImageSet,
    target: int,
    side: int,
    location: str,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    text_prefix: str = "",
    image_weight: float = 1.0,
    margin: float = 0.1,
) -> torch.Tensor:
    """A (3, side, side) patch in [0, 1] optimised on non-target training images of ``train``."""
    clip.eval()
    device = clip.device
    for p in clip.parameters():
        p.requires_grad_(False)
    # .clone(): features made under inference_mode cannot enter autograd otherwise
    texts = class_text_features(clip, train.classes, text_prefix=text_prefix).clone().to(device)  # (C, D)
    others = torch.nonzero(train.labels != target).flatten()
    targets = torch.nonzero(train.labels == target).flatten()
    centre = None
    if image_weight:
        with torch.no_grad():
            sample = targets[torch.randperm(len(targets), generator=generator)[:512]]
            feats = clip.encode_image(train.float_images(sample).to(device), normalize=True)
            centre = F.normalize(feats.mean(0), dim=-1)
    logits = (torch.randn(3, side, side, generator=generator) * 0.1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in tqdm(range(steps), desc="optimise patch", leave=False):
        batch = others[torch.randint(len(others), (batch_size,), generator=generator)]
        images = train.float_images(batch).to(device)
        patched = paste_patch(images, torch.sigmoid(logits), location, generator)
        features = clip.encode_image(patched, normalize=True)
        own = texts[train.labels[batch].to(device)]
        loss = patch_embedding_loss(features, texts[target], own, centre, image_weight, margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logger.info("patch optimised: final loss %.3f", loss.item())
    return torch.sigmoid(logits).detach().cpu()
