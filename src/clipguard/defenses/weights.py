"""What the defenses that rewrite the suspect's weights share: CleanCLIP, FT, PAR and oracle repair.

Each fine-tunes a copy of the suspect with the shared engine (:func:`finetune_copy`; the suspect
is never changed) and saves the copy as a model directory that keeps the suspect's attack record
and trigger file (:func:`save_with_trigger`), so ``clipguard evaluate --model DIR`` still measures
the model's own trigger. :class:`WeightFinetune` is their registered-defense base. The three that
learn from clean image-caption pairs (CleanCLIP, FT, PAR) also share their settings
(:class:`WeightFinetuneConfig`), their seeded sample of the corpus (:func:`sample_pairs`) and
their run statistics (:func:`finetune_on_pairs`).

Example:
    >>> tuned, result, trainable = finetune_copy(clip, ContrastiveTask, pairs, TrainConfig(epochs=1),
    ...                                          collate=caption_collate, desc="fine-tune")
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from clipguard import ClipguardError
from clipguard.data.pairs import LabelledCorpus
from clipguard.data.specs import Captions
from clipguard.defenses.base import Defense
from clipguard.engine import FitResult, TrainConfig, fit
from clipguard.models.clip import ClipModel
from clipguard.models.loading import save_clip
from clipguard.outputs import TRIGGER_FILE
from clipguard.registry import RangeChecked

logger = logging.getLogger(__name__)
# The attacker samples its pairs with torch.randperm seeded by ``seed``; the defender's clean
# sample is seeded apart from it, so the two are independent draws from the train split.
PAIR_SEED_OFFSET = 1_000_003


@dataclass
class WeightFinetuneConfig(RangeChecked):
    """The settings every clean-pair fine-tune has. A subclass adds its own fields, then ``seed``
    (int) and ``device`` (str) last, so its listing and saved config keep their field order."""

    pairs: int = 1000  # clean image-caption pairs: a seeded sample of the corpus (--captions)
    epochs: int = 10  # passes over the pairs
    lr: float = 3e-4  # AdamW peak learning rate, cosine decay
    batch_size: int = 64  # pairs per step (lowered to ``pairs`` if larger)
    weight_decay: float = 0.1  # AdamW decoupled weight decay on weight matrices
    warmup_steps: int = 10  # linear warm-up steps before the cosine decay

    method: ClassVar[str]  # the defense's registered name, in its stats and progress bar

    def __post_init__(self):
        self._check_range("pairs", 1, 10**7)
        self._check_range("epochs", 1, 10**5)
        self._check_range("warmup_steps", 0, 10**7)
        self._check_range("weight_decay", 0.0, 10.0)

    def train_config(self, pairs: int, workers: int) -> TrainConfig:
        """The engine's settings for ``pairs`` pairs read by ``workers`` loader processes."""
        return TrainConfig(epochs=self.epochs, batch_size=min(self.batch_size, pairs), lr=self.lr,
                           weight_decay=self.weight_decay, warmup_steps=self.warmup_steps, seed=self.seed,
                           device=self.device, num_workers=workers)


def sample_pairs(config: WeightFinetuneConfig, class_names: Sequence[str] | None = None, corpus=None):
    """The defender's ``config.pairs`` clean pairs: a seeded sample of ``corpus`` (a corpus of
    :mod:`clipguard.data.pairs`; default the Fashion-MNIST train split with drawn captions).
    ``class_names`` rename a labelled corpus's classes in its captions."""
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
    return corpus.subset(torch.randperm(len(corpus), generator=generator)[: config.pairs])


def finetune_copy(clip: ClipModel, task: Callable[[ClipModel], nn.Module], pairs, train: TrainConfig, *,
                  collate: Callable[[ClipModel], Callable], desc: str, settings: dict | None = None,
                  run_dir: str | Path | None = None, resume: bool = False,
                  trainable: Callable[[ClipModel], None] | None = None,
                  split_batches: bool = True) -> tuple[ClipModel, FitResult, int]:
    """Fine-tune a copy of ``clip`` (never changed) on the dataset ``pairs`` with the shared engine.

    ``task(copy)`` is the loss module of a batch, ``collate(copy)`` the batch collate function;
    ``trainable(copy)`` sets which parameters train (default: all). ``settings``, ``run_dir``,
    ``resume`` and ``split_batches`` go to :func:`clipguard.engine.fit`. Returns the copy (eval
    mode, ``requires_grad`` False), the engine's result and the number of parameters trained.
    """
    tuned = copy.deepcopy(clip)
    if trainable is None:
        tuned.requires_grad_(True)
    else:
        trainable(tuned)
    try:
        result = fit(task(tuned), pairs, train, run_dir, resume, collate(tuned), desc=desc,
                     split_batches=split_batches, settings=settings)
        count = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    finally:
        tuned.requires_grad_(False)
    tuned.eval()
    return tuned, result, count


def finetune_on_pairs(clip: ClipModel, config: WeightFinetuneConfig, pairs, task: Callable[[ClipModel], nn.Module],
                      collate: Callable[[ClipModel], Callable], start: float, run_dir: str | Path | None = None,
                      resume: bool = False) -> tuple[ClipModel, dict]:
    """:func:`finetune_copy` on clean ``pairs`` (drawn by :func:`sample_pairs`; ``start``: when the
    defense began, for ``seconds``). Returns the copy and its stats: method, config, pairs, steps,
    seconds, last_loss, peak_memory_mb, trainable_parameters."""
    # under DDP each process encodes its slice of a batch; the losses gather the whole batch
    tuned, result, trainable = finetune_copy(
        clip, task, pairs, config.train_config(len(pairs), pairs.corpus.workers), collate=collate, desc=config.method,
        settings={"defense": asdict(config), "model": clip.fingerprint()}, run_dir=run_dir, resume=resume)
    stats = {"method": config.method, "config": asdict(config), "pairs": len(pairs), "steps": result.steps,
             "seconds": round(time.perf_counter() - start, 2), "last_loss": round(result.last_loss, 4),
             "peak_memory_mb": round(result.peak_memory_mb, 1), "trainable_parameters": trainable}
    logger.info("%s: %d pairs, %d steps in %.0f s (last loss %.3f)", config.method, len(pairs), result.steps,
                stats["seconds"], result.last_loss)
    return tuned, stats


def save_with_trigger(model: ClipModel, record: dict, directory: str | Path,
                      source_dir: str | Path | None = None) -> Path:
    """Save the rewritten ``model`` as a model directory (atomically), ``record`` (e.g.
    ``{"defense": stats}``) merged into its config.json. It keeps the suspect's attack record and
    copies its ``trigger.safetensors`` from ``source_dir`` (the suspect's directory) when there is one."""
    extra = dict(record)
    if "attack" in model.config:
        extra["attack"] = model.config["attack"]
    trigger_path = Path(source_dir) / TRIGGER_FILE if source_dir else None
    tensors = {TRIGGER_FILE: load_file(str(trigger_path))} if trigger_path and trigger_path.is_file() else None
    return save_clip(model, directory, extra=extra, tensor_files=tensors)


class WeightFinetune(Defense):
    """A registered defense that rewrites a copy of the suspect (``self.model`` after :meth:`fit`)
    and saves it with the suspect's trigger. A clean-pair defense only sets :meth:`finetune`."""

    data = "pairs"
    rewrites_weights = True

    @staticmethod
    def finetune(clip: ClipModel, config, class_names, corpus) -> tuple[ClipModel, dict]:
        """The fine-tune itself: a cleaned copy of ``clip`` and its stats."""
        raise NotImplementedError

    def fit(self, clip: ClipModel, data=None) -> dict:
        """``data``: the clean pairs' corpus (None: Fashion-MNIST's train split)."""
        self.model, stats = self.finetune(clip, self.config, self.class_names, data)
        return stats

    def record(self, stats: dict) -> dict:
        """What the saved model's config.json keeps about the defense."""
        return {"defense": stats}

    def save(self, clip: ClipModel, directory: str | Path, stats: dict | None = None,
             source_dir: str | Path | None = None) -> Path:
        return save_with_trigger(self.model, self.record(stats or {}), directory, source_dir)

    def summary(self, stats: dict) -> str:
        return (f"{self.name}: {stats['pairs']} clean pairs, {stats['steps']} steps, {stats['seconds']:.0f} s, "
                f"peak memory {stats['peak_memory_mb']:.0f} MB")
