"""The text-side detector: invert a soft text key (and an image trigger) that collapses the keyed prompts.

A text-keyed backdoor (TrojVQA's dual key, Walmer et al., CVPR 2022: a patch on the image *and* a
word such as "SUDO" before the prompt) is invisible to an image-only inversion scored with plain
prompts: without the key the patch does little. Here, in one inversion (no loop over classes),

  * k soft tokens K (k, width), each initialised from a neutral word's token embedding and
    bounded in norm by a quantile of the token-embedding table's row norms, are put after
    [SOS] of every class prompt: ``[SOS] K_1..K_k a photo of a {class}. [EOS]`` -> keyed class
    features T_K (C, D);
  * jointly, a mask m (H, W) and pattern p (3, H, W) (:class:`~clipguard.detection.inversion.
    TriggerParameters`, x' = (1 - m) * x + m * p, mask area held near ``mask_budget`` by an
    adaptive L1 weight, as inversion.py holds it)

minimise, over a batch of clean shots x (B, 3, H, W) with labels y,

    L = H( mean_i softmax(s * f(x'_i) T_K^T) )            collapse: triggered shots, one class
        + keep_weight * CE(s * f(x_i) T_K^T, y_i)          the key alone keeps clean shots right
        + lambda * mean(m)

H is the entropy of the batch's mean prediction: it is lowest when every triggered shot is read
as the *same* class, whichever it is, so no target is named in advance. The keep term is the dual
key's other half: the key must not just rewrite the classifier. With ``image_trigger`` off the
key alone is inverted: L = H(mean_i softmax(s * f(x_i) T_K^T)) (a pure text trigger).

Score: the collapse under the keyed prompts, as :mod:`~clipguard.detection.patch` scores it: the
share of triggered shots of other classes read as the most-predicted class (the suspected
target). Details add the same trigger without the key (plain prompts), the key without the
trigger (clean shots), both accuracies on clean shots, the key's norm and its nearest vocabulary
tokens (decoded: evidence a person can read, e.g. 'sudo'), and the mask area.
Shapes: shots (N, 3, H, W); image features (N, D); key (k, width); class features (C, D).

Deviation: one prompt template (``template``), not the evaluation's template set: C prompts per step.
Deviation: the key is a reparametrised tensor, rows scaled to the norm bound when over it
(differentiable), instead of a projection after each step; one Adam learning rate for key and trigger.
Note: the adaptive weight lets the area swing above the budget early and pulls it back late (the
reported ``mask_area`` may exceed the budget); a hard cap at the budget separated planted from clean
tiny models worse (docs/methods.md).
Measured scores (planted and clean tiny models, the built-in model): docs/methods.md, text-side detector.

Example:
    >>> finding = get_detector("text", seed=0).run(load_clip("runs/trojvqa"), draw_shots(16))
    >>> finding.score, finding.target_name, finding.details["key_nearest_tokens"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import Detector, DetectorConfig, Finding, register
from clipguard.detection.inversion import TriggerParameters, apply_trigger, collapse_score, frozen_shots
from clipguard.distributed import broadcast_from_main
from clipguard.engine import TrainConfig, fit
from clipguard.models.clip import ClipModel


@dataclass
class TextKeyConfig(DetectorConfig):
    key_tokens: int = 3  # k soft token embeddings put before every class prompt
    init_word: str = "the"  # neutral word whose token embedding starts every key token
    norm_quantile: float = 0.5  # each key token's norm is at most this quantile of the table's row norms
    template: str = "a photo of a {}."  # the class prompt the key precedes (exactly one {})
    image_trigger: bool = True  # invert a mask + pattern jointly (TrojVQA's backdoor needs both keys)
    keep_weight: float = 1.0  # weight of the clean shots' CE under the keyed prompts (with image_trigger)
    steps: int = 150  # optimiser steps (rounded up to whole passes over the shots)
    batch_size: int = 32  # shots per step; capped at the shots
    lr: float = 0.1  # Adam on the key (in units of the norm bound / sqrt(width)) and the trigger logits
    mask_budget: float = 0.03  # mask area the adaptive lambda aims at
    lambda_init: float = 1.0  # initial weight of the mask-area term
    lambda_factor: float = 1.1  # lambda is multiplied / divided by this after each step
    nearest: int = 3  # vocabulary tokens reported per key token

    def __post_init__(self):
        for name, low, high in (("key_tokens", 1, 16), ("norm_quantile", 0.01, 1.0), ("keep_weight", 0.0, 1e4),
                                ("steps", 1, 10**6), ("batch_size", 2, 10**6), ("lr", 1e-8, 100.0),
                                ("mask_budget", 1e-4, 1.0), ("lambda_init", 0.0, 1e6), ("lambda_factor", 1.0, 10.0),
                                ("nearest", 1, 100)):
            self._check_range(name, low, high)
        if "{}" not in self.template or self.template.count("{") != 1 or self.template.count("}") != 1:
            raise ValueError(f"TextKeyConfig.template must hold exactly one {{}} and no other brace, got {self.template!r}")
        if not self.init_word.strip():
            raise ValueError("TextKeyConfig.init_word must be a word, got an empty string")


# ---------------------------------------------------------------------- losses
def mean_prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax over a batch of logits (B, C): 0 when every row predicts one
    and the same class with certainty, log C when the mean is uniform.

    >>> round(mean_prediction_entropy(torch.tensor([[9.0, -9.0], [9.0, -9.0]])).item(), 3)
    0.0
    >>> round(mean_prediction_entropy(torch.tensor([[9.0, -9.0], [-9.0, 9.0]])).item(), 3)  # log 2
    0.693
    """
    mean = logits.softmax(-1).mean(0)  # (C,)
    return -(mean * mean.clamp_min(1e-12).log()).sum()


# --------------------------------------------------------------------- prompts
def norm_bound(clip: ClipModel, quantile: float) -> float:
    """The ``quantile`` of the token-embedding table's row norms (the bound on each key token)."""
    return float(torch.quantile(clip.model.token_embedding.weight.detach().float().norm(dim=-1).cpu(), quantile))


class KeyedPrompts(nn.Module):
    """``[SOS] K_1..K_k <template with class>. [EOS]`` for every class; K is the only parameter.

    ``key()`` (k, width): the stored rows times bound / sqrt(width), each scaled down to norm
    ``bound`` when over it. ``forward(clip)`` -> (C, D) normalised keyed class features.
    """

    def __init__(self, clip: ClipModel, class_names: Sequence[str], config: TextKeyConfig):
        super().__init__()
        model = clip.model
        if not hasattr(model, "token_embedding") or not callable(getattr(model, "transformer", None)):
            raise ClipguardError("the text-side detector needs an open_clip CLIP text tower "
                                 "(token_embedding + transformer)")
        k, width = config.key_tokens, model.token_embedding.weight.shape[1]
        self.bound = norm_bound(clip, config.norm_quantile)
        self.unit = self.bound / width**0.5  # a stored coordinate of 1 is a typical coordinate at the bound
        placeholder = clip.tokenize("x")[0, 1]
        token_ids = clip.tokenize([" ".join(["x"] * k) + " " + config.template.format(name) for name in class_names])
        eos = token_ids.argmax(dim=-1)  # [EOS] has the highest id
        if bool((eos == token_ids.shape[1] - 1).any()) or not bool((token_ids[:, 1 : 1 + k] == placeholder).all()):
            raise ClipguardError(f"{k} key tokens plus the prompt {config.template!r} do not fit the text context "
                                 f"({token_ids.shape[1]} tokens) for every class; lower key_tokens")
        token_ids = token_ids[:, : int(eos.max()) + 1]  # causal mask: padding after [EOS] changes nothing
        init_ids = clip.tokenize(config.init_word)[0]
        init_ids = init_ids[1 : int(init_ids.argmax())]  # the word's tokens between [SOS] and [EOS]
        with torch.no_grad():
            embeddings = model.token_embedding(token_ids.to(clip.device))  # (C, L, width)
            start = model.token_embedding(init_ids[:1].to(clip.device)).float().cpu()  # (1, width)
        self.raw = nn.Parameter((start / self.unit).repeat(k, 1))  # (k, width)
        self.register_buffer("token_ids", token_ids, persistent=False)  # (C, L)
        self.register_buffer("prefix", embeddings[:, :1], persistent=False)  # (C, 1, width): [SOS]
        self.register_buffer("suffix", embeddings[:, 1 + k :], persistent=False)  # (C, L - 1 - k, width)

    def key(self) -> torch.Tensor:
        key = self.raw * self.unit  # (k, width)
        norms = key.norm(dim=-1, keepdim=True)
        return key * (self.bound / norms.clamp_min(self.bound))

    def forward(self, clip: ClipModel) -> torch.Tensor:
        key = self.key().to(self.prefix.dtype).expand(len(self.prefix), -1, -1)  # (C, k, width)
        embeddings = torch.cat([self.prefix, key, self.suffix], dim=1)  # (C, L, width)
        return F.normalize(clip.encode_text_embeddings(embeddings, self.token_ids), dim=-1)


def nearest_tokens(clip: ClipModel, key: torch.Tensor, count: int) -> list[list[tuple[str, float]]]:
    """For each key row (k, width): the ``count`` vocabulary tokens of highest cosine, decoded
    with the model's tokenizer where it can decode (else ``<id>``), special tokens left out."""
    table = clip.model.token_embedding.weight.detach().float()  # (V, width)
    cosine = F.normalize(key.float().to(table.device), dim=-1) @ F.normalize(table, dim=-1).T  # (k, V)
    special = torch.unique(clip.tokenize(""))  # [SOS], [EOS], padding
    cosine[:, special.to(cosine.device)] = float("-inf")
    top = cosine.topk(min(count, cosine.shape[1] - len(special)), dim=-1)
    return [[(_decode(clip, int(i)), round(float(c), 3)) for c, i in zip(row_c, row_i)]
            for row_c, row_i in zip(top.values, top.indices)]


def _decode(clip: ClipModel, token_id: int) -> str:
    tokenizer = clip.tokenizer
    for decoder in (getattr(tokenizer, "decode", None), getattr(getattr(tokenizer, "tokenizer", None), "decode", None)):
        if callable(decoder):
            try:
                return str(decoder([token_id])).strip()
            except Exception:  # a tokenizer whose decode wants another input: fall back to the id
                pass
    return f"<{token_id}>"


# ------------------------------------------------------------------- inversion
class _KeyInversionTask(nn.Module):
    """Loss of one batch (clean images, their clean features, labels) for the engine; adapts the
    mask-area weight after each loss as :mod:`~clipguard.detection.inversion` does."""

    def __init__(self, prompts: KeyedPrompts, trigger: TriggerParameters | None, clip: ClipModel,
                 config: TextKeyConfig):
        super().__init__()
        self.prompts, self.trigger, self.clip, self.config = prompts, trigger, clip, config
        self.logit_scale = float(clip.logit_scale)
        self.register_buffer("weight", torch.tensor(config.lambda_init))

    def forward(self, batch) -> torch.Tensor:
        images, clean, labels = batch
        texts = self.prompts(self.clip)  # (C, D)
        clean_logits = self.logit_scale * clean @ texts.T  # (B, C)
        if self.trigger is None:
            return mean_prediction_entropy(clean_logits)
        mask = self.trigger.mask()
        triggered = self.clip.encode_image(apply_trigger(images, mask, self.trigger.pattern()), normalize=True)
        area = mask.mean()
        loss = (mean_prediction_entropy(self.logit_scale * triggered @ texts.T)
                + self.config.keep_weight * F.cross_entropy(clean_logits, labels) + float(self.weight) * area)
        with torch.no_grad():
            over = bool(area > self.config.mask_budget)
            self.weight.mul_(self.config.lambda_factor if over else 1 / self.config.lambda_factor).clamp_(1e-3, 1e4)
        return loss


def _share_read_as(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """Share of rows of other classes than ``target`` predicted as it. predictions, labels (N,)."""
    others = labels != target
    return float((predictions[others] == target).float().mean()) if others.any() else 0.0


@register
class TextKeyDetector(Detector):
    """Score: the collapse of triggered shots under prompts led by an inverted soft text key
    (module docstring); ``text_key`` (k, width) is the key, ``apply`` the joint image trigger."""

    name = "text"
    config_class = TextKeyConfig

    def run(self, clip: ClipModel, shots: ImageSet, head: torch.Tensor | None = None) -> Finding:
        config = self.config
        start = time.perf_counter()
        images, clean = frozen_shots(clip, shots, "the text-side detector")
        prompts = KeyedPrompts(clip, shots.classes, config)
        trigger = (TriggerParameters(images.shape[-1], config.mask_budget, torch.Generator().manual_seed(config.seed))
                   if config.image_trigger else None)
        task = _KeyInversionTask(prompts, trigger, clip, config)
        batch_size = min(config.batch_size, len(images))
        epochs = -(-config.steps // (len(images) // batch_size))
        train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=config.lr, optimizer="adamw", weight_decay=0.0,
                            grad_clip=0.0, seed=config.seed, device=config.device, amp=False)
        # the batch entropy does not split over DDP processes: each runs the whole batch, rank 0's result is kept
        fit(task, TensorDataset(images, clean.cpu(), shots.labels), train, desc="text key inversion",
            split_batches=False)
        broadcast_from_main([prompts.raw] + ([trigger.mask_logits, trigger.pattern_logits] if trigger else []))
        with torch.no_grad():
            key = prompts.key().detach()
            keyed = prompts(clip)  # (C, D)
            plain = F.normalize(clip.encode_text(clip.tokenize([config.template.format(c) for c in shots.classes])),
                                dim=-1)  # (C, D)
            clean = clean.to(keyed.device)
            if trigger is not None:
                mask, pattern = trigger.mask().cpu(), trigger.pattern().cpu()
                triggered = clip.encode_image(apply_trigger(images, mask, pattern).to(clip.device), normalize=True)
            else:
                triggered = clean
            keyed_triggered = (triggered @ keyed.T).argmax(-1).cpu()  # (N,)
            keyed_clean = (clean @ keyed.T).argmax(-1).cpu()
            plain_triggered = (triggered @ plain.T).argmax(-1).cpu()
            plain_clean = (clean @ plain.T).argmax(-1).cpu()
        labels = shots.labels
        target, score = collapse_score(keyed_triggered, labels, len(shots.classes))
        key_only_target, key_only_collapse = collapse_score(keyed_clean, labels, len(shots.classes))
        nearest = nearest_tokens(clip, key, config.nearest)
        details = {
            "collapse": round(score, 4),
            "trigger_without_key": round(_share_read_as(plain_triggered, labels, target), 4),
            "key_without_trigger": round(_share_read_as(keyed_clean, labels, target), 4),
            # what the key adds to the trigger: a text-keyed backdoor needs it, an image-side collapse does not
            "key_gain": round(score - _share_read_as(plain_triggered, labels, target), 4),
            "key_only_collapse": round(key_only_collapse, 4), "key_only_target": shots.classes[key_only_target],
            "keyed_clean_accuracy": round(float((keyed_clean == labels).float().mean()), 4),
            "plain_clean_accuracy": round(float((plain_clean == labels).float().mean()), 4),
            "key_tokens": config.key_tokens, "key_norm": round(float(key.norm(dim=-1).max()), 4),
            "key_norm_bound": round(prompts.bound, 4),
            "key_nearest_tokens": [[word for word, _ in row] for row in nearest],
            "key_nearest_cosine": [[cos for _, cos in row] for row in nearest],
            "image_trigger": config.image_trigger,
            "mask_area": round(float(mask.mean()), 4) if trigger is not None else 0.0,
            "seconds": round(time.perf_counter() - start, 2),
        }
        tensors = {"text_key": key.cpu()}
        apply = None
        if trigger is not None:
            tensors.update(mask=mask, pattern=pattern)
            apply = lambda batch: apply_trigger(batch, mask.to(batch.device), pattern.to(batch.device))  # noqa: E731
        return Finding(detector=self.name, score=score, target_name=shots.classes[target], tensors=tensors,
                       details=details, apply=apply, text_key=key.cpu())
