"""CleanCLIP (Bansal et al., "CleanCLIP: Mitigating Data Poisoning Attacks in Multimodal
Contrastive Learning", ICCV 2023) and plain contrastive fine-tuning (FT): docs/methods.md, baselines.

The defender fine-tunes the whole suspect CLIP on clean image-caption pairs with

    L = L_CLIP(I, T) + lambda * (L_II(I, I~) + L_TT(T, T~)) / 2

L_CLIP is CLIP's symmetric InfoNCE (:func:`clipguard.losses.clip_contrastive_loss`); the
unimodal terms are the same InfoNCE *within* one modality, between each image I and an
augmented view I~ of it, and between each caption T and an augmented caption T~. As in
CleanCLIP's reference code, the plain sample is contrasted with one augmented view at CLIP's
logit scale and the two in-modal terms are averaged; that code takes each in-modal
cross-entropy in one direction, we make it symmetric like L_CLIP. Learning each modality on its own
breaks the trigger -> target-text shortcut the poisoned pairs taught. FT is the same with
lambda = 0 (no views are made at all).

Our choices for Fashion-MNIST-sized data:
- Clean pairs: a seeded sample of the corpus (``--captions``; default the Fashion-MNIST train split with the project's training
  captions (:func:`clipguard.data.captions.training_caption`), redrawn every epoch. The sample
  is seeded apart from the attacker's, which also draws from the train split.
- Image views (:func:`augment_images`): random resized crop (50-100 % of the area, aspect
  3/4-4/3), horizontal flip, brightness and contrast jitter (+-40 %) at ``augment_strength``
  1; pure tensor functions on [0, 1] images, seeded per (seed, epoch, index).
- Caption views (:func:`augment_caption`): another training caption of the same image (a
  different template, or size/tone words). CleanCLIP uses EDA (synonym swap, word deletion);
  at our vocabulary a second caption keeps the class name and the meaning, EDA could delete
  the class word.

Shapes: images and their views (B, 3, H, W) in [0, 1]; image, text and view features (B, D),
L2-normalised; caption ids (B,).

Deviation: the in-modal terms are symmetric like L_CLIP (the reference code takes one direction).
Deviation: on labelled pairs a caption view is another training caption of the same image, not
EDA; on a user's caption corpus it is EDA's deletion and swap (:func:`eda_caption`).
Deviation: lr 3e-4 instead of the paper's 5e-6, for only 1,000 clean pairs (docs/results/baselines.md).
Numbers: docs/results/baselines.md.

Example:
    >>> tuned, stats = cleanclip_finetune(clip, CleanCLIPConfig(pairs=1000, epochs=10))
    >>> stats["method"], stats["steps"]
    ('cleanclip', 150)
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipguard import ClipguardError
from clipguard.data.captions import training_caption
from clipguard.defenses.base import Defense, register
from clipguard.data.pairs import LabelledCorpus
from clipguard.data.specs import Captions
from clipguard.distributed import gather_batch
from clipguard.engine import TrainConfig, fit
from clipguard.losses import clip_contrastive_loss
from clipguard.models.contrastive import CaptionedImages
from clipguard.models.clip import ClipModel
from clipguard.models.loading import save_clip
from clipguard.registry import RangeChecked

logger = logging.getLogger(__name__)
# The attacker samples its pairs with torch.randperm seeded by ``seed``; the defender's clean
# sample is seeded apart from it, so the two are independent draws from the train split.
PAIR_SEED_OFFSET = 1_000_003


@dataclass
class CleanCLIPConfig(RangeChecked):
    pairs: int = 1000  # clean image-caption pairs: a seeded sample of the corpus (--captions)
    epochs: int = 10  # passes over the pairs (paper: 10)
    lr: float = 3e-4  # AdamW peak learning rate, cosine decay (paper: 5e-6 at CC3M scale; docs/results/baselines.md)
    batch_size: int = 64  # pairs per step (lowered to ``pairs`` if larger)
    weight_decay: float = 0.1  # AdamW decoupled weight decay on weight matrices
    warmup_steps: int = 10  # linear warm-up steps before the cosine decay
    lambda_: float = 1.0  # weight of the unimodal (image-image + text-text) terms; 0 = plain FT
    augment_strength: float = 1.0  # image-view strength: 0 = none, 1 = crop 50-100 %, flip, +-40 % jitter
    seed: int = 0  # seeds the pair sample, captions, views, batch order and the fine-tune
    device: str = "auto"  # auto | cpu | cuda

    method: ClassVar[str] = "cleanclip"

    def __post_init__(self):
        self._check_range("pairs", 1, 10**7)
        self._check_range("epochs", 1, 10**5)
        self._check_range("batch_size", 1, 10**6)
        self._check_range("warmup_steps", 0, 10**7)
        self._check_range("lambda_", 0.0, 1000.0)
        self._check_range("augment_strength", 0.0, 1.0)
        self._check_range("weight_decay", 0.0, 10.0)
        if not self.lr > 0:
            raise ValueError(f"{type(self).__name__}.lr must be > 0, got {self.lr}")


@dataclass
class FinetuneConfig(CleanCLIPConfig):
    """Plain contrastive fine-tuning on clean pairs (FT): CleanCLIP without the unimodal terms."""

    lambda_: float = 0.0  # FT: no unimodal terms

    method: ClassVar[str] = "finetune"

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_ != 0:
            raise ValueError(f"FinetuneConfig.lambda_ must be 0 (cleanclip has the unimodal terms), "
                             f"got {self.lambda_}")


CONFIGS = {cls.method: cls for cls in (CleanCLIPConfig, FinetuneConfig)}


def config_for(method: str) -> CleanCLIPConfig:
    """The default config of ``method`` ("cleanclip" or "finetune")."""
    if method not in CONFIGS:
        raise ClipguardError(f"unknown fine-tuning defense {method!r}; choose one of: {', '.join(CONFIGS)}")
    return CONFIGS[method]()


# ------------------------------------------------------------------------ augmentations
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


# ------------------------------------------------------------------------------ losses
def unimodal_contrastive_loss(features: torch.Tensor, views: torch.Tensor, logit_scale: torch.Tensor | float,
                              ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same samples within one modality.

    features, views: (B, D), L2-normalised, row i of each from sample i. ids: (B,), equal
    for samples that are the same (identical captions), which are then positives of each
    other, as in :func:`clip_contrastive_loss`.

    >>> f = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    >>> round(unimodal_contrastive_loss(f, f, 1.0).item(), 4)  # log(1 + 2 / e)
    0.5514
    """
    return clip_contrastive_loss(features, views, logit_scale, ids)


def cleanclip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                   caption_ids: torch.Tensor | None = None, image_views: torch.Tensor | None = None,
                   text_views: torch.Tensor | None = None, lambda_: float = 1.0) -> torch.Tensor:
    """L_CLIP + lambda * (L_II + L_TT) / 2. All features (B, D), L2-normalised; caption_ids (B,)
    marks identical captions. Without views (or with lambda 0) this is L_CLIP alone (FT)."""
    loss = clip_contrastive_loss(image_features, text_features, logit_scale, caption_ids)
    if lambda_ and image_views is not None and text_views is not None:
        in_modal = (unimodal_contrastive_loss(image_features, image_views, logit_scale)
                    + unimodal_contrastive_loss(text_features, text_views, logit_scale, caption_ids))
        loss = loss + lambda_ * 0.5 * in_modal
    return loss


# ------------------------------------------------------------------------- the fine-tune
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


def _collate(clip: ClipModel):
    """Stack images (and views), tokenise captions (and caption views)."""

    def collate(items):
        columns = list(zip(*items))
        batch = [torch.stack(columns[0]), clip.tokenize(columns[1])]
        if len(columns) == 4:
            batch += [torch.stack(columns[2]), clip.tokenize(columns[3])]
        return tuple(batch)

    return collate


class _CleanCLIPTask(nn.Module):
    """The loss of one batch ``(images, tokens[, image views, caption-view tokens])`` for the engine."""

    def __init__(self, clip: ClipModel, lambda_: float):
        super().__init__()
        self.clip, self.lambda_ = clip, lambda_

    def forward(self, batch) -> torch.Tensor:
        images, tokens = batch[0], batch[1]
        n = len(images)
        if len(batch) == 4:  # one image and one text pass for both views
            images, tokens = torch.cat([images, batch[2]]), torch.cat([tokens, batch[3]])
        image_features = self.clip.encode_image(images, normalize=True)  # (n or 2n, D)
        # identical captions are frequent here: encode each once
        unique_tokens, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        text_features = self.clip.encode_text(unique_tokens, normalize=True)[inverse]  # (n or 2n, D)
        # under DDP each process encoded its slice (n rows) of the batch: every term is taken over
        # the whole batch (gather_batch), with caption ids that match across processes
        _, caption_ids = torch.unique(gather_batch(batch[1]), dim=0, return_inverse=True)  # (N,)
        views = ((gather_batch(image_features[n:]), gather_batch(text_features[n:])) if len(batch) == 4
                 else (None, None))
        return cleanclip_loss(gather_batch(image_features[:n]), gather_batch(text_features[:n]), self.clip.logit_scale,
                              caption_ids, *views, lambda_=self.lambda_)


def clean_pairs(config: CleanCLIPConfig, class_names: Sequence[str] | None = None, corpus=None) -> CleanPairs:
    """The defender's ``config.pairs`` clean pairs, a seeded sample of ``corpus`` (default: the
    Fashion-MNIST train split with drawn captions; views only when lambda_ > 0). ``class_names``
    rename a labelled corpus's classes in its captions."""
    corpus = corpus if corpus is not None else Captions().load()  # the built-in default
    if class_names is not None and corpus.labels is not None:
        if len(class_names) != len(corpus.classes):
            raise ClipguardError(f"class_names must name the corpus's {len(corpus.classes)} classes, "
                                 f"got {len(class_names)}")
        corpus = LabelledCorpus(corpus.images.renamed(tuple(class_names)))
    if config.pairs > len(corpus):
        raise ClipguardError(f"pairs={config.pairs} exceeds the corpus's {len(corpus)} pairs; set pairs={len(corpus)} "
                             "or fewer")
    generator = torch.Generator().manual_seed(config.seed + PAIR_SEED_OFFSET)
    pool = corpus.subset(torch.randperm(len(corpus), generator=generator)[: config.pairs])
    return CleanPairs(pool, config.seed, config.augment_strength if config.lambda_ > 0 else None)


def cleanclip_finetune(clip: ClipModel, config: CleanCLIPConfig | None = None,
                       class_names: Sequence[str] | None = None, run_dir: str | Path | None = None,
                       resume: bool = False, corpus=None) -> tuple[ClipModel, dict]:
    """CleanCLIP (or FT, with a :class:`FinetuneConfig`) of a copy of ``clip``.

    ``clip`` is not modified. ``corpus``: the clean pairs' corpus (:mod:`clipguard.data.pairs`;
    default Fashion-MNIST's train split); ``class_names`` are the names a labelled corpus's
    captions use (default: its own). ``run_dir``/``resume``: the engine's
    checkpoint. Returns the fine-tuned model (eval mode, ``requires_grad`` False) and stats:
    seconds, steps, last_loss, peak_memory_mb, trainable_parameters, pairs, method.
    """
    config = config or CleanCLIPConfig()
    start = time.perf_counter()
    pairs = clean_pairs(config, class_names, corpus)
    tuned = copy.deepcopy(clip)
    train = TrainConfig(epochs=config.epochs, batch_size=min(config.batch_size, len(pairs)), lr=config.lr,
                        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, seed=config.seed,
                        device=config.device, num_workers=pairs.corpus.workers)
    tuned.requires_grad_(True)
    try:
        # under DDP each process encodes its slice of a batch; the losses gather the whole batch
        result = fit(_CleanCLIPTask(tuned, config.lambda_), pairs, train, run_dir, resume, _collate(tuned),
                     desc=config.method, settings={"defense": asdict(config), "model": clip.fingerprint()})
        trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    finally:
        tuned.requires_grad_(False)
    tuned.eval()
    stats = {"method": config.method, "config": asdict(config), "pairs": len(pairs), "steps": result.steps,
             "seconds": round(time.perf_counter() - start, 2), "last_loss": round(result.last_loss, 4),
             "peak_memory_mb": round(result.peak_memory_mb, 1), "trainable_parameters": trainable,
             "clip_parameters": sum(p.numel() for p in tuned.parameters())}
    logger.info("%s: %d pairs, %d steps in %.0f s (last loss %.3f)", config.method, len(pairs), result.steps,
                stats["seconds"], result.last_loss)
    return tuned, stats


def save_finetuned_model(tuned: ClipModel, stats: dict, directory: str | Path,
                         source_dir: str | Path | None = None) -> Path:
    """Save the fine-tuned model directory (atomically). It keeps the suspect model's attack
    record and copies its ``trigger.safetensors`` from ``source_dir``, so ``clipguard evaluate
    --model DIR`` still measures the model's own trigger; ``stats`` go under "defense"."""
    from safetensors.torch import load_file

    from clipguard.outputs import TRIGGER_FILE

    extra = {"defense": stats}
    if "attack" in tuned.config:
        extra["attack"] = tuned.config["attack"]
    trigger_path = Path(source_dir) / TRIGGER_FILE if source_dir else None
    tensors = {TRIGGER_FILE: load_file(str(trigger_path))} if trigger_path and trigger_path.is_file() else None
    return save_clip(tuned, directory, extra=extra, tensor_files=tensors)


class _WeightFinetune(Defense):
    """A registered defense that fine-tunes a copy of the suspect on clean pairs (CleanCLIP or FT)."""

    data = "pairs"
    rewrites_weights = True

    @staticmethod
    def finetune(clip: ClipModel, config, class_names, corpus) -> tuple[ClipModel, dict]:
        """The fine-tune itself: a cleaned copy of ``clip`` and its stats (a subclass swaps it)."""
        return cleanclip_finetune(clip, config, class_names, corpus=corpus)

    def fit(self, clip: ClipModel, data=None) -> dict:
        """``data``: the clean pairs' corpus (None: Fashion-MNIST's train split)."""
        self.model, stats = self.finetune(clip, self.config, self.class_names, data)
        return stats

    def save(self, clip: ClipModel, directory: str | Path, stats: dict | None = None,
             source_dir: str | Path | None = None) -> Path:
        return save_finetuned_model(self.model, stats or {}, directory, source_dir)

    def summary(self, stats: dict) -> str:
        return (f"{self.name}: {stats['pairs']} clean pairs, {stats['steps']} steps, {stats['seconds']:.0f} s, "
                f"peak memory {stats['peak_memory_mb']:.0f} MB")


@register
class CleanCLIP(_WeightFinetune):
    """CleanCLIP: the CLIP loss plus in-modal self-supervision on clean pairs (see the module docstring)."""

    name = "cleanclip"
    config_class = CleanCLIPConfig


@register
class Finetune(_WeightFinetune):
    """Plain contrastive fine-tuning on clean pairs (CleanCLIP with lambda = 0)."""

    name = "finetune"
    config_class = FinetuneConfig
