"""Segmentation oracles for the oracle-guided repair: image -> regions (boolean masks + boxes).

EftCLIP (docs/methods.md, oracle-guided repair) lets a segmentation oracle (FastSAM in the paper) supervise
the suspect CLIP. clipguard's default oracle needs no weights: a classical segmenter from
scikit-image. FastSAM through ``ultralytics`` is an optional backend for users who have its
weights.

The classical oracle proposes the union of thresholded connected components (of colourful
pixels, and of pixels that stand out from the background colour) and Felzenszwalb-Huttenlocher
graph segments, duplicates removed. Region masks are (H, W) bool for a (3, H, W) image in [0, 1].

Deviation: a weight-free classical segmenter by default instead of FastSAM (optional backend here).
Deviation: FastSAM runs unprompted ("segment everything"), not prompted with CLIP's labels.
Why this segmenter (the comparison with SLIC and each proposal alone): docs/results/oracle-repair.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from clipguard import ClipguardError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """One segment of an image.

    mask: (H, W) bool; box: (top, left, bottom, right), bottom/right exclusive;
    source: which proposal made it ("chroma", "contrast", "felzenszwalb", "fastsam").
    """

    mask: torch.Tensor
    box: tuple[int, int, int, int]
    source: str

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a non-empty (H, W) bool mask; bottom/right exclusive.

    >>> m = torch.zeros(5, 5, dtype=torch.bool); m[1:3, 2:4] = True; mask_box(m)
    (1, 2, 3, 4)
    """
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two (H, W) bool masks (0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def background_colour(image: torch.Tensor) -> torch.Tensor:
    """(3,) per-channel median of the image's border pixels: the background's colour."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (3, 4W)
    return border.median(dim=1).values


# ------------------------------------------------ region operations (pure tensor functions)
def isolate_regions(images: torch.Tensor, masks: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Each region alone on its image's background colour.

    images: (R, 3, H, W); masks: (R, H, W) bool; background: (R, 3) -> (R, 3, H, W).
    """
    keep = masks[:, None].to(images.dtype)  # (R, 1, H, W)
    return images * keep + background[:, :, None, None] * (1 - keep)


def fill_regions(images: torch.Tensor, masks: torch.Tensor, ring: int = 2) -> torch.Tensor:
    """Mask each region by filling it with the mean colour of a ``ring``-pixel band around it.

    images: (R, 3, H, W); masks: (R, H, W) bool -> (R, 3, H, W). A region with no band
    (it covers the image) is filled with the image's mean colour.
    """
    inside = masks[:, None].to(images.dtype)  # (R, 1, H, W)
    grown = F.max_pool2d(inside, kernel_size=2 * ring + 1, stride=1, padding=ring)  # (R, 1, H, W)
    band = grown - inside
    count = band.sum((2, 3))  # (R, 1)
    band_mean = (images * band).sum((2, 3)) / count.clamp(min=1)  # (R, 3)
    fill = torch.where(count > 0, band_mean, images.mean((2, 3)))  # (R, 3)
    return images * (1 - inside) + fill[:, :, None, None] * inside


def paste_regions(sources: torch.Tensor, masks: torch.Tensor, destinations: torch.Tensor) -> torch.Tensor:
    """Paste each source's region into its destination at the same place.

    sources, destinations: (R, 3, H, W); masks: (R, H, W) bool -> (R, 3, H, W).
    """
    keep = masks[:, None].to(sources.dtype)  # (R, 1, H, W)
    return destinations * (1 - keep) + sources * keep


class SegmentationOracle:
    """Base class: ``segment(image)`` returns the regions of one (3, H, W) image in [0, 1]."""

    name: ClassVar[str]

    def segment(self, image: torch.Tensor) -> list[Region]:
        raise NotImplementedError

    def segment_batch(self, images: torch.Tensor) -> list[list[Region]]:
        """(B, 3, H, W) -> one list of regions per image."""
        return [self.segment(image) for image in images]


def _regions_from_labels(labels: np.ndarray, source: str, min_area: int) -> list[Region]:
    regions = []
    for value in np.unique(labels):
        if value < 0:
            continue
        mask = torch.from_numpy(labels == value)
        if int(mask.sum()) >= min_area:
            regions.append(Region(mask, mask_box(mask), source))
    return regions


@dataclass
class ClassicalOracleConfig:
    proposals: tuple[str, ...] = ("chroma", "contrast", "felzenszwalb")  # proposal kinds, unioned
    chroma_threshold: float = 0.1  # a pixel is colourful when max - min channel exceeds this
    contrast_threshold: float = 0.1  # ... stands out when its grey level differs from the background by this
    felzenszwalb_scale: float = 100.0  # larger: fewer, bigger segments
    felzenszwalb_sigma: float = 0.5  # Gaussian pre-smoothing (0.5 keeps noise patches in one piece)
    felzenszwalb_min_size: int = 8  # smallest Felzenszwalb segment, pixels
    min_area: int = 2  # regions smaller than this (pixels) are dropped

    def __post_init__(self):
        known = {"chroma", "contrast", "felzenszwalb"}
        if not self.proposals or set(self.proposals) - known:
            raise ValueError(f"ClassicalOracleConfig.proposals must be a non-empty subset of {sorted(known)}, "
                             f"got {self.proposals!r}")
        for name in ("chroma_threshold", "contrast_threshold"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"ClassicalOracleConfig.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.felzenszwalb_scale <= 0:
            raise ValueError(f"ClassicalOracleConfig.felzenszwalb_scale must be > 0, got {self.felzenszwalb_scale}")
        if self.min_area < 1:
            raise ValueError(f"ClassicalOracleConfig.min_area must be >= 1, got {self.min_area}")


class ClassicalOracle(SegmentationOracle):
    """Weight-free oracle: connected components of thresholded colour / contrast maps plus
    Felzenszwalb-Huttenlocher graph segments (scikit-image), duplicates removed.

    >>> image = torch.zeros(3, 28, 28); image[:, 5:9, 5:9] = 1.0
    >>> [r.box for r in ClassicalOracle().segment(image) if r.source == "contrast"]
    [(5, 5, 9, 9)]
    """

    name = "classical"

    def __init__(self, config: ClassicalOracleConfig | None = None):
        self.config = config or ClassicalOracleConfig()

    def segment(self, image: torch.Tensor) -> list[Region]:
        from skimage.measure import label as connected_components
        from skimage.segmentation import felzenszwalb

        c = self.config
        image = image.detach().float().cpu()
        regions: list[Region] = []
        if "chroma" in c.proposals:
            chroma = (image.max(0).values - image.min(0).values) > c.chroma_threshold  # (H, W)
            regions += _regions_from_labels(connected_components(chroma.numpy(), connectivity=2, background=0) - 1,
                                            "chroma", c.min_area)
        if "contrast" in c.proposals:
            grey = image.mean(0)
            standout = (grey - background_colour(image).mean()).abs() > c.contrast_threshold  # (H, W)
            regions += _regions_from_labels(connected_components(standout.numpy(), connectivity=2, background=0) - 1,
                                            "contrast", c.min_area)
        if "felzenszwalb" in c.proposals:
            segments = felzenszwalb(image.permute(1, 2, 0).double().numpy(), scale=c.felzenszwalb_scale,
                                    sigma=c.felzenszwalb_sigma, min_size=c.felzenszwalb_min_size, channel_axis=-1)
            regions += _regions_from_labels(segments, "felzenszwalb", c.min_area)
        return _deduplicate(regions)


def _deduplicate(regions: list[Region]) -> list[Region]:
    seen, unique = set(), []
    for region in regions:
        key = region.mask.numpy().tobytes()
        if key not in seen:
            seen.add(key)
            unique.append(region)
    return unique


@dataclass
class FastSAMOracleConfig:
    weights: str | None = None  # path to FastSAM weights (e.g. FastSAM-s.pt); required
    device: str = "cpu"  # where ultralytics runs FastSAM
    image_size: int = 640  # FastSAM's inference resolution (images are upscaled to it)
    confidence: float = 0.4  # FastSAM's mask confidence threshold
    iou: float = 0.9  # FastSAM's NMS IoU threshold
    min_area: int = 2  # regions smaller than this (pixels, at the input size) are dropped

    def __post_init__(self):
        if not 0 < self.confidence < 1:
            raise ValueError(f"FastSAMOracleConfig.confidence must be in (0, 1), got {self.confidence}")


INSTALL_FASTSAM = ("the fastsam oracle needs the 'ultralytics' package (pip install ultralytics) and FastSAM "
                   "weights passed as weights=/path/to/FastSAM-s.pt; or use the weight-free oracle 'classical'")


class FastSAMOracle(SegmentationOracle):
    """FastSAM (Zhao et al., 2023) through ``ultralytics``, imported only when used.

    Unprompted "segment everything" mode: the paper prompts the oracle with CLIP's labels,
    but Algorithm 1 here classifies every region anyway, so prompting is not needed to find
    candidates. Images are upscaled to ``image_size`` for FastSAM; masks come back at the
    input size.
    """

    name = "fastsam"

    def __init__(self, config: FastSAMOracleConfig | None = None):
        self.config = config or FastSAMOracleConfig()
        weights = self.config.weights
        if not weights or not Path(weights).is_file():
            where = f" ({weights} not found)" if weights else ""
            raise ClipguardError(INSTALL_FASTSAM + where)
        try:
            from ultralytics import FastSAM
        except ImportError:
            raise ClipguardError(INSTALL_FASTSAM) from None
        self.model = FastSAM(weights)

    def segment(self, image: torch.Tensor) -> list[Region]:
        c = self.config
        height, width = image.shape[-2:]
        pixels = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        results = self.model(pixels, device=c.device, retina_masks=True, imgsz=c.image_size, conf=c.confidence,
                             iou=c.iou, verbose=False)
        if not results or results[0].masks is None:
            return []
        masks = results[0].masks.data.float()[:, None]  # (R, 1, h, w)
        masks = torch.nn.functional.interpolate(masks, size=(height, width), mode="nearest")[:, 0] > 0.5
        regions = [Region(m.cpu(), mask_box(m.cpu()), "fastsam") for m in masks if int(m.sum()) >= c.min_area]
        return _deduplicate(regions)


ORACLES: dict[str, tuple[type[SegmentationOracle], type]] = {
    "classical": (ClassicalOracle, ClassicalOracleConfig),
    "fastsam": (FastSAMOracle, FastSAMOracleConfig),
}


def build_oracle(name: str = "classical", **options) -> SegmentationOracle:
    """An oracle by name with config overrides, e.g. ``build_oracle("fastsam", weights="FastSAM-s.pt")``."""
    if name not in ORACLES:
        raise ClipguardError(f"unknown oracle {name!r}; choose one of: {', '.join(sorted(ORACLES))}")
    cls, config_class = ORACLES[name]
    try:
        config = config_class(**options)
    except (TypeError, ValueError) as err:
        raise ClipguardError(f"oracle {name}: {err}") from None
    return cls(config)
