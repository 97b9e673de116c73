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
