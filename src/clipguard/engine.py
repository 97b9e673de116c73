"""The one training loop: seeding, device, progress, checkpoint + resume, DDP.

Everything clipguard trains (the built-in model, backdoor fine-tunes, prompts) goes through
:func:`fit`. The thing trained is a *task*: an ``nn.Module`` whose ``forward(batch)`` returns
the scalar loss, so that under DDP the wrapped forward synchronises gradients. Only its
parameters with ``requires_grad`` are optimised and checkpointed.

Batches are drawn by :class:`EpochBatchSampler`, whose order depends only on (seed, epoch),
so a run resumed from a checkpoint sees exactly the batches it would have seen.

Under ``torchrun`` the small helpers below (:func:`is_main_process`, :func:`barrier`,
:func:`shard`, :func:`gather_rows`, :func:`broadcast_from_main`) let evaluation split its
batches over the processes and let commands write files from rank 0 only;
:func:`gather_batch` lets a contrastive task's loss see the whole batch while each process
encodes only its slice of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from clipguard.models.loading import resolve_device

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


# ----------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when run under ``torchrun`` (WORLD_SIZE > 1); pick the device.

    Backend: nccl on CUDA, gloo on CPU. Outside torchrun this is a no-op.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world <= 1:
        return DistInfo(), resolved
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        resolved = torch.device(resolved.type, local_rank)  # one GPU per process
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank), resolved


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_process() -> DistInfo:
    """Rank and world size of the joined process group; ``DistInfo()`` (rank 0 of 1) outside one."""
    if not _grouped():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one process that writes files and prints."""
    return current_process().is_main


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process), e.g. before reading what
    rank 0 wrote."""
    if _grouped():
        dist.barrier()


def close_distributed() -> None:
    """Wait for every process, then leave the process group (no-op outside one), so that a
    command run under ``torchrun`` ends in all processes together."""
    if _grouped():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor of counts over DDP processes (identity in a single process)."""
    if _grouped():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def shard(count: int) -> range:
    """The items of ``range(count)`` (e.g. batch numbers) this process handles: rank, rank +
    world_size, ... Every item belongs to exactly one process; in a single process, to it.

    >>> list(shard(5))  # outside torchrun
    [0, 1, 2, 3, 4]
    """
    info = current_process()
    return range(info.rank, count, info.world_size)


def gather_rows(blocks: list[tuple[int, torch.Tensor]], total: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Assemble a (total, D) tensor from row blocks computed on different processes.

    blocks: this process's ``(first_row, rows)`` pairs, rows (b, D); together the processes
    cover every row exactly once. In a single process the blocks (in row order) are simply
    concatenated. Under DDP each process writes its rows into zeros and the tensors are summed:
    every element is one process's value plus exact zeros, so the result is bit-identical to
    what one process computing all blocks would hold (for integer and float rows alike).

    >>> gather_rows([(0, torch.ones(2, 3)), (2, torch.zeros(1, 3))], 3).shape  # one process
    torch.Size([3, 3])
    """
    if not _grouped():
        return torch.cat([rows for _, rows in sorted(blocks, key=lambda block: block[0])])
    # a process with no block (fewer blocks than processes) does not know D: take the largest
    width = torch.tensor([blocks[0][1].shape[1] if blocks else 0], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    out = torch.zeros(total, int(width), device=device, dtype=dtype)
    for first, rows in blocks:
        out[first : first + len(rows)] = rows
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (no-op in a single process).

    For results every process computes redundantly (e.g. a trigger inversion) that must be
    identical everywhere even where a GPU kernel is not bit-reproducible.
    """
    if not _grouped():
        return
    # nccl moves only CUDA tensors; gloo moves both
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for tensor in tensors:
            buffer = tensor.data.to(on) if on is not None else tensor.data
            dist.broadcast(buffer, src=0)
            if buffer is not tensor.data:
                tensor.data.copy_(buffer)


_batch_split = DistInfo()  # how the running fit deals out its batches (world_size > 1: split over DDP)


@contextlib.contextmanager
def _splitting(split: DistInfo):
    global _batch_split
    previous, _batch_split = _batch_split, split
    try:
        yield
    finally:
        _batch_split = previous


def gather_batch(rows: torch.Tensor) -> torch.Tensor:
    """This process's slice (b, ...) of the running fit's batch -> the whole batch (B, ...).

    For a loss over the whole batch (a contrastive one; open_clip's ``gather_features`` with
    ``gather_with_grad``) under :func:`fit` with DDP and split batches: the processes' contiguous
    slices are concatenated in rank order, i.e. the batch's own order, with autograd for rows
    that require grad. The loss L of the gathered batch is then the same in every process; each
    slice receives the sum over processes of dL/dslice (world_size times its gradient), and DDP's
    average over world_size processes cancels that: every parameter gets the one-process dL/dtheta.
    Identity (the same tensor) in one process, outside :func:`fit` and with ``split_batches=False``.
    """
    if _batch_split.world_size == 1:
        return rows
    if rows.requires_grad:
        from torch.distributed.nn.functional import all_gather  # with autograd

        with warnings.catch_warnings():  # deprecated for a private module's; the same gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(rows))
    slices = [torch.empty_like(rows) for _ in range(_batch_split.world_size)]
    dist.all_gather(slices, rows.contiguous())
    return torch.cat(slices)


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


def _save_checkpoint(path: Path, task: nn.Module, optimizer, scheduler, step: int, config: TrainConfig) -> None:
    state = {
        "trainable": {n: p.detach().cpu() for n, p in task.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "config": json.dumps(asdict(config)),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, task: nn.Module, optimizer, scheduler) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(task.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
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
    resume: bool = False,
    collate_fn=None,
    desc: str = "train",
    split_batches: bool = True,
) -> FitResult:
    """Train ``task``'s trainable parameters on ``dataset``; ``task(batch)`` returns the loss.

    Args:
        task: module whose forward maps a collated batch to a scalar loss.
        dataset: map-style dataset; if it has ``set_epoch(e)`` it is called each epoch, so
            per-epoch randomness (e.g. caption choice) follows the seed too.
        config: optimisation settings (see :class:`TrainConfig`).
        run_dir: where ``checkpoint.pt`` is written (every ``checkpoint_every`` steps and at
            epoch ends); ``resume=True`` continues from it.
        split_batches: under DDP, each process takes its slice of every batch and gradients
            are averaged, which equals the full-batch gradient for a loss that is a mean over
            samples, or one computed on the whole batch's features from :func:`gather_batch`
            (a contrastive loss). ``False`` for another loss that does not split: every process
            then trains on the whole batch, redundantly, and computes what one process would.
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
    if resume and checkpoint and checkpoint.exists():
        step = _load_checkpoint(checkpoint, task, optimizer, scheduler)
        logger.info("resumed from %s at step %d/%d", checkpoint, step, total_steps)
    if checkpoint and dist_info.is_main:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    model = task
    if data_parallel.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(task, device_ids=ids)
    use_amp = config.amp and device.type == "cuda"
    start, losses = time.perf_counter(), []
    progress = tqdm(total=total_steps, initial=step, desc=desc, disable=not dist_info.is_main, dynamic_ncols=True)
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
        for batch in loader:
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp), _splitting(data_parallel):
                loss = model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
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
            if checkpoint and dist_info.is_main and (periodic or at_epoch_end):
                _save_checkpoint(checkpoint, task, optimizer, scheduler, step, config)
    progress.close()
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
