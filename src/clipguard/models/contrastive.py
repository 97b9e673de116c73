"""Contrastive training pieces shared by the built-in model, the attacks and the defenses:
caption pairs of labelled images, CLIP's contrastive loss as an engine task, the collate function."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from clipguard.data.pairs import LabelledCorpus
from clipguard.distributed import gather_batch
from clipguard.losses import clip_contrastive_loss
from clipguard.models.clip import ClipModel


class CaptionedImages(Dataset):
    """(float image (3, H, W), caption) pairs of a corpus (:mod:`clipguard.data.pairs`), decoded
    item by item (in DataLoader workers during a fit).

    A labelled corpus draws fresh captions each epoch under (seed, epoch, index); a CSV or
    webdataset corpus gives its own caption. ``images``: the corpus, or a labelled image set.
    """

    def __init__(self, images, seed: int):
        self.corpus = images if hasattr(images, "caption") else LabelledCorpus(images)
        self.seed, self.epoch = seed, 0

    @property
    def images(self):
        """The labelled set behind a labelled corpus (its ``classes`` and ``labels``), else the corpus."""
        return getattr(self.corpus, "images", self.corpus)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.corpus)

    def image(self, index: int) -> torch.Tensor:
        """Float (3, H, W) in [0, 1] of item ``index``."""
        return self.corpus.float_images(torch.tensor([index]))[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.pair(index, self.image(index))

    def pair(self, index: int, image: torch.Tensor) -> tuple[torch.Tensor, str]:
        """``image`` (3, H, W) with this epoch's caption of item ``index``."""
        return image, self.corpus.caption(index, self.seed, self.epoch, image)


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
