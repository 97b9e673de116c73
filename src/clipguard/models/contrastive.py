"""Contrastive training pieces shared by the built-in model, the attacks and the defenses:
caption pairs of labelled images, CLIP's contrastive loss as an engine task, the collate function."""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.utils.data import Dataset

from clipguard.data.captions import training_caption
from clipguard.data.fmnist import ImageSet
from clipguard.distributed import gather_batch
from clipguard.losses import clip_contrastive_loss
from clipguard.models.clip import ClipModel


class CaptionedImages(Dataset):
    """(image, caption) pairs; each epoch draws fresh captions under (seed, epoch, index).

    images: uint8 (N, C, H, W); captions are built from the class name and the image.
    """

    def __init__(self, images: ImageSet, seed: int):
        self.images, self.seed, self.epoch = images, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.pair(index, self.images.float_images(index)[0])

    def pair(self, index: int, image: torch.Tensor) -> tuple[torch.Tensor, str]:
        """``image`` (3, H, W) with this epoch's caption of item ``index``'s own class."""
        rng = random.Random(hash((self.seed, self.epoch, index)))  # int tuples hash alike in every process
        name = self.images.classes[int(self.images.labels[index])]
        return image, training_caption(name, image, rng)


class ContrastiveTask(nn.Module):
    """CLIP's contrastive loss on a batch ``(images (B, 3, H, W), token_ids (B, L))``.

    Under DDP with split batches each process encodes its slice and the loss is taken over the
    whole batch (:func:`clipguard.distributed.gather_batch`): the same loss and gradient as one process.
    """

    def __init__(self, clip: ClipModel):
        super().__init__()
        self.clip = clip

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, token_ids = batch  # under DDP: this process's slice (b rows) of the batch
        # Identical captions are frequent here: encode each once (exact, and ~2x less text work).
        unique_ids, inverse = torch.unique(token_ids, dim=0, return_inverse=True)
        image_features = self.clip.encode_image(images, normalize=True)  # (b, D)
        text_features = self.clip.encode_text(unique_ids, normalize=True)[inverse]  # (b, D)
        # ids over the whole batch, so identical captions held by different processes match
        _, caption_ids = torch.unique(gather_batch(token_ids), dim=0, return_inverse=True)  # (B,)
        return clip_contrastive_loss(gather_batch(image_features), gather_batch(text_features),
                                     self.clip.logit_scale, caption_ids)


def caption_collate(clip: ClipModel):
    """collate_fn: stack images, tokenise captions."""

    def collate(items):
        images, captions = zip(*items)
        return torch.stack(images), clip.tokenize(captions)

    return collate
