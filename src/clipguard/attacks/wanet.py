"""WaNet (Nguyen & Tran, 2021): warp the image with a smooth, seeded random field via grid_sample.

The mean displacement is about strength / 2 pixels. The paper's s = 0.5 (a quarter pixel) does
not take as a CLIP backdoor at 28 px; measured on the built-in model (3 % poisoned, 5 epochs):
s = 0.5: ASR 1.03 %; s = 4: ASR 85.63 % (CA 89.38); s = 8: ASR 95.40 % (CA 89.43). Default 8.
The public CleanCLIP code's WaNet is ``grid_k=224, strength=1`` (at 224 px) with a field of its own
drawing; ``grid_file`` (its ``backdoor/noise_grid_k=224_s=1_inputheight=224_gridrescale=1.pt``)
and ``strength=1`` give its very warp."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipguard import ClipguardError
from clipguard.attacks.base import Trigger, TriggerConfig, register
from clipguard.config import added_setting


@dataclass
class WaNetConfig(TriggerConfig):
    grid_k: int = 4  # control-grid size k (k x k random displacements, resized to the image; CleanCLIP's code: 224)
    strength: float = 8.0  # s: displacement scale; ~s/2 px on average (paper: 0.5, too weak here)
    grid_file: str | None = added_setting(None)  # a saved noise grid (the public code's .pt, or .safetensors key noise_grid) used instead of a drawn one; grid_k is then ignored

    def __post_init__(self):
        self._check_range("grid_k", 2, 1024)
        self._check_range("strength", 0.0, 100.0)


def load_noise_grid(path: str | Path) -> torch.Tensor:
    """The (1, H, W, 2) noise grid saved in ``path``: a torch-saved tensor or a dict holding
    ``noise_grid`` (read with ``weights_only=True``: no code in the file runs), or a
    .safetensors file with the key ``noise_grid``; (H, W, 2) is taken as (1, H, W, 2)."""
    from clipguard.models.loading import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise ClipguardError(f"WaNet grid_file {path} is not a file; give the path of the noise grid (.pt or .safetensors)")
    if path.suffix == ".safetensors":
        grid = read_safetensors(path).get("noise_grid")
    else:
        try:
            grid = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):  # not a pickle of objects: just not a torch file
                raise ClipguardError(f"cannot read WaNet grid_file {path} as a torch-saved tensor (not a torch file); "
                                     "give the public code's noise grid .pt") from None
            raise ClipguardError(f"WaNet grid_file {path} holds objects other than tensors, refused (loading them "
                                 "could run code); save the noise grid tensor alone") from None
        except Exception as err:  # torch raises many types (KeyError, RuntimeError...) for a foreign file
            reason = (str(err).strip().splitlines() or [""])[0][:120]
            raise ClipguardError(f"cannot read WaNet grid_file {path} as a torch-saved tensor ({type(err).__name__}: "
                                 f"{reason}); give the public code's noise grid .pt") from None
        if isinstance(grid, dict):
            grid = grid.get("noise_grid")
    if not isinstance(grid, torch.Tensor):
        raise ClipguardError(f"WaNet grid_file {path} holds no noise_grid tensor; give a tensor of shape (1, H, W, 2)")
    if grid.dim() == 3:
        grid = grid[None]
    if grid.dim() != 4 or grid.shape[0] != 1 or grid.shape[-1] != 2 or min(grid.shape[1:3]) < 2:
        raise ClipguardError(f"WaNet grid_file {path} holds a tensor of shape {tuple(grid.shape)}; expected (1, H, W, 2)")
    if not grid.is_floating_point() or not torch.isfinite(grid).all():
        raise ClipguardError(f"WaNet grid_file {path} holds non-float or non-finite values; the file is damaged")
    return grid.float()


@register
class WaNet(Trigger):
    """x' = grid_sample(x, clamp(identity + s * field / H, -1, 1)), bilinear, align_corners=True;
    field (1, H, W, 2): k x k uniform(-1, 1) displacements scaled to mean |.| 1, bicubic-resized to H
    (Nguyen & Tran's, as the public code draws it), or the grid in ``grid_file``, bicubic-resized
    (align_corners=True, as that code's upsample) when its size is not H. Images (B, 3, H, W).
    The saved ``grid`` keeps the warp: evaluation does not read ``grid_file`` again.
    """

    name = "wanet"
    config_class = WaNetConfig
    file_settings = ("grid_file",)

    def __init__(self, config: WaNetConfig, image_size: int):
        super().__init__(config, image_size)
        if config.grid_file:  # used as saved when it has the image's size, as the public code does
            field = load_noise_grid(config.grid_file).permute(0, 3, 1, 2)  # (1, 2, h, w)
            resize = tuple(field.shape[-2:]) != (image_size, image_size)
        else:
            k = config.grid_k
            field = torch.rand(1, 2, k, k, generator=self.generator) * 2 - 1
            field, resize = field / field.abs().mean(), True
        if resize:
            field = F.interpolate(field, size=image_size, mode="bicubic", align_corners=True)  # (1, 2, H, W)
        axis = torch.linspace(-1, 1, image_size)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)[None]  # (1, H, W, 2), x then y
        self.grid = (identity + config.strength * field.permute(0, 2, 3, 1) / image_size).clamp(-1, 1)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(images.device).expand(len(images), -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"grid": self.grid}
