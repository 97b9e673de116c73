"""CleanCLIP's views (docs/methods.md, baselines): an augmented image and an augmented caption per pair.

- Image views (:func:`augment_images`): random resized crop (50-100 % of the area, aspect
  3/4-4/3), horizontal flip, brightness and contrast jitter (+-40 %) at strength 1; pure tensor
  functions on [0, 1] images, each draw from the generator passed in.
- Caption views of a labelled corpus (:func:`augment_caption`): another training caption of the same
  image (a different template, or size/tone words). CleanCLIP uses EDA (synonym swap, word
  deletion); at our vocabulary a second caption keeps the class name and the meaning, EDA could
  delete the class word.
- Caption views of a user's caption corpus (:func:`eda_caption`): EDA's deletion and swap.
:class:`CleanPairs` gives each clean pair its two views, seeded per (seed, epoch, index).

Shapes: images and their views (B, 3, H, W) in [0, 1].

Deviation: on labelled pairs a caption view is another training caption of the same image, not EDA.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from clipguard.data.captions import training_caption
from clipguard.models.contrastive import CaptionedImages


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_probability: float = 0.5) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, H, W): per image a random box holding ``scale`` of the
    area with aspect ``ratio`` (clipped to the image), resized back to H x W (bilinear, so values
    stay in [0, 1]), mirrored left-right with ``flip_probability``.

    >>> x = torch.rand(2, 3, 28, 28)
    >>> random_resized_crop(x, torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3, 28, 28])
    """
    b = len(images)
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    aspect = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    half_w = (area * aspect).sqrt().clamp(max=1.0)  # box half-width in normalised coordinates
    half_h = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(b, generator=generator) * 2 - 1) * (1 - half_w)  # box stays inside
    centre_y = (torch.rand(b, generator=generator) * 2 - 1) * (1 - half_h)
    mirror = torch.where(torch.rand(b, generator=generator) < flip_probability, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)  # output grid [-1, 1]^2 -> input box
    theta[:, 0, 0], theta[:, 0, 2] = half_w * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = half_h, centre_y
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(images: torch.Tensor, generator: torch.Generator, brightness: float = 0.4,
                  contrast: float = 0.4) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> same shape in [0, 1]: per image, scale brightness by a factor in
    [1 - brightness, 1 + brightness], then contrast (distance to the image's mean) likewise.
    Fashion-MNIST is grey, so saturation and hue jitter would do nothing."""
    b = len(images)
    bright = 1 + (torch.rand(b, generator=generator) * 2 - 1) * brightness  # (B,)
    contr = 1 + (torch.rand(b, generator=generator) * 2 - 1) * contrast  # (B,)
    x = (images * bright.to(images).view(b, 1, 1, 1)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return ((x - mean) * contr.to(images).view(b, 1, 1, 1) + mean).clamp(0, 1)


def augment_images(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """CleanCLIP's image view: crop + flip + jitter at ``strength`` in [0, 1] (0: a copy).

    images: (B, 3, H, W) in [0, 1]; the result has the same shape, in [0, 1], and depends only
    on ``images`` and the generator's state.

    >>> g = torch.Generator().manual_seed(0); x = torch.rand(1, 3, 28, 28)
    >>> torch.equal(augment_images(x, g, 0.0), x)
    True
    """
    if strength == 0:
        return images.clone()
    log_ratio = math.log(4 / 3) * strength
    cropped = random_resized_crop(images, generator, scale=(1 - 0.5 * strength, 1.0),
                                  ratio=(math.exp(-log_ratio), math.exp(log_ratio)))
    return colour_jitter(cropped, generator, 0.4 * strength, 0.4 * strength)


def augment_caption(class_name: str, image: torch.Tensor, rng: random.Random, avoid: str = "",
                    tries: int = 4) -> str:
    """CleanCLIP's text view: another training caption of ``image`` (3, H, W) naming
    ``class_name``, different from ``avoid`` when ``tries`` draws allow.

    >>> augment_caption("bag", torch.zeros(3, 28, 28), random.Random(0), avoid="a photo of a bag.")
    'a small dark bag.'
    """
    caption = avoid
    for _ in range(tries):
        caption = training_caption(class_name, image, rng)
        if caption != avoid:
            break
    return caption


def eda_caption(caption: str, rng: random.Random, p: float = 0.1) -> str:
    """A caption view as CleanCLIP makes for web captions (EDA, Wei and Zou 2019, without the
    thesaurus): each word deleted with probability ``p`` (one is always kept), then two words swapped.

    >>> eda_caption("a photo of a red banana on a table", random.Random(0))
    'a photo of a red on banana a table'
    """
    words = caption.split()
    kept = [w for w in words if rng.random() >= p] or [rng.choice(words)] if words else []
    if len(kept) > 1:
        i, j = rng.sample(range(len(kept)), 2)
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)


class CleanPairs(CaptionedImages):
    """Clean (image, caption) pairs of a corpus; with ``augment_strength`` not None also an image
    view and a caption view per item, seeded by (seed, epoch, index) like the captions."""

    def __init__(self, corpus, seed: int, augment_strength: float | None):
        super().__init__(corpus, seed)
        self.augment_strength = augment_strength

    def __getitem__(self, index: int):
        image, caption = super().__getitem__(index)
        if self.augment_strength is None:
            return image, caption
        generator = torch.Generator().manual_seed(((self.seed * 100_003 + self.epoch) * 10_000_019 + index) % 2**63)
        view = augment_images(image[None], generator, self.augment_strength)[0]
        rng = random.Random(f"cleanclip/{self.seed}/{self.epoch}/{index}")
        if self.corpus.labels is None:  # a caption corpus: EDA's deletion and swap on its own caption
            return image, caption, view, eda_caption(caption, rng)
        name = self.corpus.classes[int(self.corpus.labels[index])]
        return image, caption, view, augment_caption(name, image, rng, avoid=caption)
