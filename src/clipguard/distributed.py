"""Multi-process helpers for ``torchrun`` (DDP): process group, rank 0, sharding, gathers.

Under ``torchrun`` the helpers (:func:`is_main_process`, :func:`barrier`, :func:`shard`,
:func:`gather_rows`, :func:`broadcast_from_main`) let evaluation split its batches over the
processes and let commands write files from rank 0 only; :func:`gather_batch` lets a
contrastive task's loss see the whole batch while each process encodes only its slice of it.
In a single process every helper is a no-op or the identity.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipguard.device import resolve_device


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


def close_distributed(wait: bool = True) -> None:
    """Wait for every process (unless ``wait`` is False, e.g. on an error), then leave the
    process group (no-op outside one), so that a command run under ``torchrun`` ends in all
    processes together. Every torchrun worker calls it before exiting: a gloo group left to
    be torn down at interpreter exit can abort the process."""
    if _grouped():
        if wait:
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
def splitting_batches(split: DistInfo):
    """Within: :func:`gather_batch` gathers over ``split``'s processes (what :func:`fit` sets)."""
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


def agree(ok: bool) -> bool:
    """Rank 0's ``ok`` in every process (``ok`` itself in a single process): lets a check that only
    rank 0 can make (e.g. taking a lock) stop every process together."""
    if not _grouped():
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    broadcast_from_main([flag])
    return bool(flag.item())
