"""The one training loop: seeding, device, progress, checkpoint + resume, DDP.

Everything clipguard trains (the built-in model, backdoor fine-tunes, prompts) goes through
:func:`fit`. The thing trained is a *task*: an ``nn.Module`` whose ``forward(batch)`` returns
the scalar loss, so that under DDP the wrapped forward synchronises gradients. Only its
parameters with ``requires_grad`` are optimised and checkpointed. A task whose loss changes
over training defines ``set_progress(step, total_steps)``; :func:`fit` calls it before each
step (resumed runs included).

Batches are drawn by :class:`EpochBatchSampler`, whose order depends only on (seed, epoch),
so a run resumed from a checkpoint sees exactly the batches it would have seen.

Under ``torchrun`` each process joins the group (:mod:`clipguard.distributed`) and DDP
synchronises the task's gradients; with ``split_batches`` each process encodes its slice of a
batch and :func:`clipguard.distributed.gather_batch` gives the loss the whole batch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from clipguard import ClipguardError
from clipguard.data.stream import one_line_errors
from clipguard.distributed import DistInfo, init_distributed, splitting_batches
from clipguard.outputs import atomic_write

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the data
    batch_size: int = 256  # global batch (split across DDP processes)
    lr: float = 5e-4  # peak learning rate
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.1  # decoupled; not applied to biases, gains and 1-d parameters
    warmup_steps: int = 0  # linear warm-up, then cosine decay to zero
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    seed: int = 0  # seeds python, numpy, torch and the batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # DataLoader worker processes
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only)
    amp: bool = True  # bf16 autocast, used on CUDA only

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")


@dataclass
class FitResult:
    steps: int  # optimiser steps taken in total (including before a resume)
    seconds: float  # wall time of this call
    last_loss: float  # mean loss over the last epoch's batches run in this call
    peak_memory_mb: float  # peak CUDA memory, or peak RSS of the process on CPU


# --------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/python seeds from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------- batches
class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a seeded permutation; epoch ``e`` uses seed ``seed + e``.

    Each DDP process takes its contiguous slice of every global batch. ``start_batch`` skips
    batches already trained before a resume. The last incomplete batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, dist_info: DistInfo = DistInfo()):
        if n < batch_size:
            raise ValueError(f"dataset of {n} items is smaller than one batch ({batch_size}); lower batch_size")
        self.n, self.batch_size, self.seed, self.dist = n, batch_size, seed, dist_info
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        per_rank = self.batch_size // self.dist.world_size
        for b in range(self.start_batch, self.n // self.batch_size):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]


# ---------------------------------------------------------------- optimisation
def _make_optimizer(params: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.Optimizer:
    def decays(name: str, p: nn.Parameter) -> bool:  # weight matrices; not 1-d gains/biases, nor bare
        # embedding parameters such as positional_embedding (token_embedding.weight does decay)
        return p.ndim >= 2 and "embedding" not in name.split(".")[-1]

    decay = [p for n, p in params if decays(n, p)]
    no_decay = [p for n, p in params if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def _cosine_with_warmup(total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# Settings that change where or how often a fit runs, not what it computes: a resume may change them.
_RUN_ONLY = ("device", "num_workers", "checkpoint_every")


def run_settings(config: TrainConfig, settings: dict | None = None) -> dict:
    """What a checkpoint must agree with to be resumed: the train config and the caller's settings."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _RUN_ONLY}
        return value

    return json.loads(json.dumps(strip({**(settings or {}), "train": asdict(config)}), sort_keys=True, default=str))


def settings_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``["attack: 'badnet' -> 'blended'", "train.lr: 0.0001 -> 0.0002"]``: what differs, saved -> current.

    >>> settings_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ['b.c: 2 -> 3']
    """
    differences = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if isinstance(old, dict) and isinstance(new, dict):
            differences += settings_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return differences


def checkpoint_settings(path: Path) -> dict | None:
    """The settings recorded in checkpoint ``path`` (None when it is missing or unreadable)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(state["settings"])
    except Exception:
        return None


class StaleCheckpoint(ClipguardError):
    """The checkpoint to resume was made with other settings (or trains other parameters)."""


def _check_finite(params: list[tuple[str, nn.Parameter]], step: int, total_steps: int, desc: str, lr: float) -> None:
    for name, p in params:
        if not torch.isfinite(p.detach()).all():
            raise ClipguardError(f"{desc}: {name} became NaN or inf by step {step} of {total_steps}: the fit diverged "
                                 f"and nothing was saved; lower the learning rate (lr={lr:g})")


def _save_checkpoint(path: Path, task: nn.Module, optimizer, scheduler, step: int, config: TrainConfig,
                     settings: dict) -> None:
    state = {
        "trainable": {n: p.detach().cpu() for n, p in task.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "config": json.dumps(asdict(config)),
        "settings": json.dumps(settings, sort_keys=True),
        "torch_rng": torch.get_rng_state(),
    }
    # the folder is made with the first checkpoint: a run that saves none leaves none; an
    # interrupted save keeps the previous checkpoint
    atomic_write(path, lambda tmp: torch.save(state, tmp), f"{path.name}.tmp")


def _load_checkpoint(path: Path, task: nn.Module, optimizer, scheduler, settings: dict) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["settings"]) if "settings" in state else None
        trainable = state["trainable"]
    except Exception as err:
        raise ClipguardError(f"cannot resume from {path} ({type(err).__name__}): not a clipguard checkpoint, or "
                             "damaged; run without --resume to start over") from None
    if saved is None:  # an older checkpoint: only the train config was recorded
        saved = {**settings, "train": run_settings(TrainConfig(**json.loads(state["config"])))["train"]}
    differences = settings_differences(saved, settings)
    if differences:
        raise StaleCheckpoint(f"{path} was made with other settings ({'; '.join(differences)}); resume with "
                             "the same settings, or run without --resume to start over")
    params = dict(task.named_parameters())
    if set(trainable) != {n for n, p in params.items() if p.requires_grad}:
        raise StaleCheckpoint(f"{path} trains other parameters than this run; run without --resume to start over")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def fit(
    task: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool | str = False,
    collate_fn=None,
    desc: str = "train",
    split_batches: bool = True,
    settings: dict | None = None,
) -> FitResult:
    """Train ``task``'s trainable parameters on ``dataset``; ``task(batch)`` returns the loss.

    Args:
        task: module whose forward maps a collated batch to a scalar loss.
        dataset: map-style dataset; if it has ``set_epoch(e)`` it is called each epoch, so
            per-epoch randomness (e.g. caption choice) follows the seed too.
        config: optimisation settings (see :class:`TrainConfig`).
        run_dir: where ``checkpoint.pt`` is written (every ``checkpoint_every`` steps and at
            epoch ends); ``resume=True`` continues from it (refusing one made with other
            settings); ``resume="matching"`` continues only from a checkpoint of the same settings
            and otherwise starts over (the bench's cache).
        split_batches: under DDP, each process takes its slice of every batch and gradients
            are averaged, which equals the full-batch gradient for a loss that is a mean over
            samples, or one computed on the whole batch's features from :func:`gather_batch`
            (a contrastive loss). ``False`` for another loss that does not split: every process
            then trains on the whole batch, redundantly, and computes what one process would.
        settings: what else defines the run (e.g. the attack record), JSON-able. The checkpoint
            records it with ``config``; a resume with other settings is refused, naming them.
    Raises:
        ClipguardError: the loss or a trained tensor became NaN or inf (nothing is saved), or
            the checkpoint to resume was made with other settings.
    Returns:
        :class:`FitResult`. The task is left in eval mode with its trained parameters.
    """
    dist_info, device = init_distributed(config.device)
    data_parallel = dist_info if split_batches else DistInfo()  # how batches are split over processes
    seed_everything(config.seed)
    if config.batch_size % data_parallel.world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {data_parallel.world_size} processes")
    task.to(device).train()
    params = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the task has no trainable parameters")
    sampler = EpochBatchSampler(len(dataset), config.batch_size, config.seed, data_parallel)
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * config.epochs
    optimizer = _make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total_steps, config.warmup_steps))
    checkpoint = Path(run_dir) / CHECKPOINT_NAME if run_dir else None
    step = 0
    recorded = run_settings(config, settings)
    if resume and checkpoint and checkpoint.exists():
        try:
            step = _load_checkpoint(checkpoint, task, optimizer, scheduler, recorded)
            logger.info("resumed from %s at step %d/%d", checkpoint, step, total_steps)
        except StaleCheckpoint as err:
            if resume != "matching":
                raise
            logger.warning("%s: starting over", str(err).split(";")[0])
    model = task
    if data_parallel.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(task, device_ids=ids)
    use_amp = config.amp and device.type == "cuda"
    start, losses = time.perf_counter(), []
    progress = tqdm(total=total_steps, initial=step, desc=desc, disable=not dist_info.is_main, dynamic_ncols=True)
    try:  # closed on an error too: the error message then starts its own line
        while step < total_steps:
            epoch, start_batch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start_batch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            loader = DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
                worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(config.seed + epoch),
            )
            losses = []
            for batch in one_line_errors(loader):  # a worker's unreadable image: its one-line message
                batch = _to_device(batch, device)
                if hasattr(task, "set_progress"):
                    task.set_progress(step, total_steps)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp), splitting_batches(data_parallel):
                    loss = model(batch)
                if not torch.isfinite(loss):
                    raise ClipguardError(f"{desc}: the loss became {loss.item()} at step {step + 1} of {total_steps}: the "
                                         f"fit diverged and nothing was saved; lower the learning rate (lr={config.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(loss.item())
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
                at_epoch_end = step % steps_per_epoch == 0
                periodic = config.checkpoint_every and step % config.checkpoint_every == 0
                if checkpoint and (periodic or at_epoch_end):
                    _check_finite(params, step, total_steps, desc, config.lr)
                    if dist_info.is_main:
                        _save_checkpoint(checkpoint, task, optimizer, scheduler, step, config, recorded)
    finally:
        progress.close()
    _check_finite(params, step, total_steps, desc, config.lr)
    task.eval()
    return FitResult(step, time.perf_counter() - start, float(np.mean(losses)) if losses else float("nan"),
                     peak_memory_mb(device))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
