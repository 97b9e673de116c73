"""Where computation runs: ``--device auto | cpu | cuda | cuda:N`` resolved to a ``torch.device``.

It sits below every package (models, distributed, engine), so none of them imports another for it.
"""

from __future__ import annotations

import re

import torch

from clipguard import ClipguardError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """``device`` if it names a device clipguard can run on, else a ClipguardError (before any work)."""
    if not DEVICE_PATTERN.match(str(device)):
        raise ClipguardError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    return str(device)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; cpu, cuda, cuda:N and mps are checked and passed on.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if check_device(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ClipguardError(f"--device {device} was asked for but no CUDA GPU is visible; use --device auto or cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ClipguardError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return resolved


CLEAR_REFS, STATUS = "/proc/self/clear_refs", "/proc/self/status"  # Linux's per-process memory files


class PeakMemory:
    """The peak memory of one stretch of work (a bench cell), counted from a reset when it is made,
    so each stretch reports its own peak whatever ran before it.

    On CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated``. On CPU (Linux):
    writing ``5`` to ``/proc/self/clear_refs`` resets the process's peak resident set size to its
    current size, and ``VmHWM`` in ``/proc/self/status`` is then the stretch's peak (what was already
    resident, such as the loaded model, counts too); where that reset is not possible (not Linux, a
    kernel before 4.0) the peak is not measured (None). Child processes (DataLoader workers) are not
    counted, and the reset also lowers what ``getrusage`` and ``/usr/bin/time`` later report as
    the process's peak."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "max allocated (CUDA)"
            return
        try:
            with open(CLEAR_REFS, "w") as clear:
                clear.write("5")
            measured = _peak_rss_kib() is not None
        except OSError:
            measured = False
        self.kind = "peak RSS during the cell (CPU)" if measured else "not measured"

    def peak_mb(self) -> float | None:
        """The peak since the reset, in MiB to 0.1 (None: not measured)."""
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        kib = _peak_rss_kib() if self.kind != "not measured" else None
        return None if kib is None else round(kib / 1024, 1)


def _peak_rss_kib() -> int | None:
    """``VmHWM`` of ``/proc/self/status`` (the peak resident set size, KiB), None where there is none."""
    try:
        with open(STATUS) as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
    except OSError:
        return None
