"""RVPT: Repulsive Visual Prompt Tuning (Zhang et al., 2025; docs/methods.md, RVPT), and VPT.

Deep visual prompts in the later vision blocks are trained on a few clean labelled shots with

    L = L_CE + alpha * L_FR,   L_FR = mean over images and prompted blocks of cos(c_d, s_d)

where c_d is the prompted model's [CLS] state after block d and s_d the frozen model's, both
(B, width); the prompts are (prompt_length, width) per prompted block. All
CLIP weights stay frozen. VPT is the same with alpha = 0 (the baseline showing that prompt
tuning alone does not purify). The unprompted blocks' output and the frozen targets s_d are
computed once for the shots and reused every epoch (exact, not a deviation).

Deviation (ours, off): ``centred`` subtracts the frozen model's mean [CLS] state before the cosine.
Deviation (ours, off): ``alpha_schedule`` ramp / decay instead of a constant alpha (:func:`alpha_at`).
Numbers: docs/results/rvpt.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clipguard import ClipguardError
from clipguard.config import added_setting
from clipguard.data.fmnist import ImageSet
from clipguard.defenses.base import Defense, DefenseConfig, register
from clipguard.engine import TrainConfig, fit
from clipguard.models.zeroshot import class_text_features
from clipguard.models.clip import ClipModel
from clipguard.models.prompted import DeepVisualPrompts, check_prompt_support, frozen_prefix, run_blocks, vision_stem


def feature_repelling_loss(
    prompted_cls: torch.Tensor,
    frozen_cls: torch.Tensor,
    margin: float | None = None,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """RVPT's L_FR. prompted_cls, frozen_cls: (B, n_blocks, width) [CLS] states.

    Per image, the mean cosine over blocks; with ``margin`` m each image's term is max(., m)
    (m = 1 switches the repulsion off, i.e. plain VPT). Returns the batch mean.
    centre: (n_blocks, width), subtracted from both states first (our variant: the [CLS]
    stream carries a large component shared by all images, which dominates the cosine).

    >>> x = torch.randn(2, 3, 8); feature_repelling_loss(x, -x).item()
    -1.0
    """
    if centre is not None:
        prompted_cls, frozen_cls = prompted_cls - centre, frozen_cls - centre
    per_image = F.cosine_similarity(prompted_cls, frozen_cls, dim=-1).mean(1)  # (B,)
    if margin is not None:
        per_image = per_image.clamp(min=margin)
    return per_image.mean()


ALPHA_SCHEDULES = ("constant", "ramp", "decay")


def alpha_at(alpha: float, schedule: str, step: int, total_steps: int) -> float:
    """The repelling weight at training step ``step`` (0-based) of ``total_steps``.

    With p = min(step, total_steps - 1) / (total_steps - 1) (0 at the first step, 1 at the last):
    ``constant`` alpha, ``ramp`` alpha * p, ``decay`` alpha * (1 - p).

    Deviation (ours, the paper's alpha is constant): ``ramp`` lets L_CE fit first and repels more and
    more; ``decay`` repels hardest first and leaves the last steps to L_CE. Numbers:
    docs/results/rvpt.md (repulsion schedule).

    >>> [alpha_at(4.0, s, 1, 5) for s in ALPHA_SCHEDULES]
    [4.0, 1.0, 3.0]
    """
    if schedule == "constant" or total_steps <= 1:
        return alpha
    progress = min(step, total_steps - 1) / (total_steps - 1)  # 0 at the first step, 1 at the last
    return alpha * (progress if schedule == "ramp" else 1 - progress)


@dataclass
class RVPTConfig(DefenseConfig):
    prompt_length: int = 50  # b: prompt tokens per prompted block (paper: 50)
    start_block: int | None = None  # D: blocks before D are unprompted; None = a quarter (paper: 3 of 12)
    alpha: float = 2.0  # weight of the feature-repelling loss (paper: 2)
    margin: float | None = None  # margin variant max(L_FR_i, m); None = full repulsion
    epochs: int = 50  # passes over the shots (paper: 50)
    lr: float = 0.002  # SGD (momentum 0.9), cosine schedule (paper: 0.002)
    batch_size: int = 32  # paper: 32
    prompt: str = "a photo of a {}."  # text prompt of the frozen class features
    centred: bool = False  # repel states centred on the frozen model's mean state (our variant)
    alpha_schedule: str = added_setting("constant")  # constant | ramp (0 -> alpha) | decay (alpha -> 0), linear over the steps

    def __post_init__(self):
        self._check_range("shots", 1, 10**6)
        self._check_range("prompt_length", 1, 1000)
        if self.start_block is not None:
            self._check_range("start_block", 0, 1000)
        self._check_range("alpha", 0.0, 1000.0)
        self._check_range("epochs", 1, 100000)
        self._check_range("lr", 1e-8, 10.0)
        self._check_range("batch_size", 1, 10**6)
        if self.margin is not None:
            self._check_range("margin", -1.0, 1.0)
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"{type(self).__name__}.alpha_schedule must be one of {', '.join(ALPHA_SCHEDULES)}, "
                             f"got {self.alpha_schedule!r}")


class RVPTTask(nn.Module):
    """Loss of one batch (prefix tokens, frozen [CLS] states, labels) for the engine."""

    def __init__(self, prompts: DeepVisualPrompts, clip: ClipModel, text_features: torch.Tensor, config: RVPTConfig,
                 centre: torch.Tensor | None):
        super().__init__()
        self.prompts, self.visual = prompts, clip.model.visual
        self.register_buffer("text_features", text_features)  # (C, D), normalised, frozen
        self.register_buffer("centre", centre)  # (n_blocks, width) or None
        self.logit_scale = float(clip.logit_scale)
        self.alpha, self.margin, self.schedule = config.alpha, config.margin, config.alpha_schedule
        self.step, self.total_steps = 0, 1  # set by the engine before each step (set_progress)

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps

    def forward(self, batch) -> torch.Tensor:
        prefix, frozen_cls, labels = batch
        features, cls_states = self.prompts(self.visual, prefix)
        logits = self.logit_scale * F.normalize(features, dim=-1) @ self.text_features.T  # (B, C)
        loss = F.cross_entropy(logits, labels)
        alpha = alpha_at(self.alpha, self.schedule, self.step, self.total_steps)
        if alpha:
            repel = feature_repelling_loss(torch.stack(cls_states, 1), frozen_cls, self.margin, self.centre)
            loss = loss + alpha * repel
        return loss


@register
class RVPT(Defense):
    name = "rvpt"
    config_class = RVPTConfig

    def __init__(self, config: RVPTConfig, clip: ClipModel, class_names):
        super().__init__(config, clip, class_names)
        self.check_model(config, clip)
        visual = clip.model.visual
        blocks = len(visual.transformer.resblocks)
        start_block = blocks // 4 if config.start_block is None else config.start_block
        width = visual.conv1.out_channels
        generator = torch.Generator().manual_seed(config.seed)
        self.prompts = DeepVisualPrompts(blocks, start_block, config.prompt_length, width, generator)

    @classmethod
    def check_model(cls, config: RVPTConfig, clip: ClipModel) -> None:
        check_prompt_support(clip.model.visual)
        blocks = len(clip.model.visual.transformer.resblocks)
        if config.start_block is not None and not 0 <= config.start_block < blocks:
            raise ClipguardError(f"{cls.name}: start_block={config.start_block} is out of range for this model, which "
                                 f"has {blocks} vision blocks: give 0 to {blocks - 1} (unset: {blocks // 4}, a quarter)")

    def fit(self, clip: ClipModel, shots: ImageSet) -> dict:
        config = self.config
        start = time.perf_counter()
        clip.requires_grad_(False)
        pixels = clip.preprocess(shots.float_images().to(clip.device))
        prefix, frozen_cls = frozen_prefix(clip.model.visual, pixels, self.prompts.start_block)
        cache_seconds = time.perf_counter() - start
        texts = class_text_features(clip, self.class_names, templates=(config.prompt,)).clone()
        centre = frozen_cls.mean(0) if config.centred else None  # (n_blocks, width), fixed
        task = RVPTTask(self.prompts, clip, texts, config, centre)
        dataset = TensorDataset(prefix.cpu(), frozen_cls.cpu(), shots.labels)
        result = fit(task, dataset, self.train_config(len(dataset)), desc=self.name)
        self.eval()
        return {"seconds": round(time.perf_counter() - start, 2), "prefix_cache_seconds": round(cache_seconds, 3),
                "steps": result.steps, "last_loss": result.last_loss, "peak_memory_mb": round(result.peak_memory_mb, 1),
                **self.parameter_counts(clip)}

    def train_config(self, examples: int) -> TrainConfig:
        """The engine settings of a fit on ``examples`` shots: SGD, cosine schedule, no decay."""
        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=min(c.batch_size, examples), lr=c.lr, optimizer="sgd",
                           weight_decay=0.0, seed=c.seed, device=c.device, grad_clip=0.0)

    def _prompted(self, clip: ClipModel, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image features and all blocks' [CLS] states of the prompted tower."""
        visual = clip.model.visual
        x, early = run_blocks(visual, vision_stem(visual, clip.preprocess(images)), 0, stop=self.prompts.start_block)
        features, late = self.prompts(visual, x)
        return features, early + late

    def encode_image(self, clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._prompted(clip, images)[0], dim=-1)

    def cls_states(self, clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._prompted(clip, images)[1], dim=1)


@dataclass
class VPTConfig(RVPTConfig):
    alpha: float = 0.0  # VPT: no repulsion


@register
class VPT(RVPT):
    """Plain deep visual prompt tuning (RVPT with alpha = 0)."""

    name = "vpt"
    config_class = VPTConfig
