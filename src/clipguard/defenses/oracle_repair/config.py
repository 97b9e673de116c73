"""The settings of oracle-guided repair (Algorithm 1's region tests, Algorithm 2's victim test, the fine-tune)."""

from __future__ import annotations

from dataclasses import dataclass

from clipguard.config import added_setting


@dataclass
class OracleRepairConfig:
    oracle: str = "classical"  # segmentation oracle: classical | fastsam
    oracle_weights: str | None = None  # FastSAM weights file (fastsam oracle only)
    max_region_fraction: float = 0.15  # regions above this share of the image are not tested
    crop_confidence: float = 0.7  # (a): min probability of t for the region alone
    support_max: float = 0.3  # (b): t's probability once the region is masked must stay below this
    fill_ring: int = 2  # masking fills a region with the mean of a ring this many pixels wide
    region_groups: bool = added_setting(False)  # also test, per image, unions of the regions that each lower t's log-odds
    group_min_drop: float = added_setting(0.5)  # a region can join its image's group when masking it lowers t's log-odds this much
    transfer_images: int = 16  # (d): pool images (predicted != t) each candidate region is pasted onto
    transfer_min: float = 0.5  # (d): share of them the pasted region must turn into t
    expand_victims: bool = added_setting(False)  # also take as victims images of a victim label that a found trigger region, masked, flips
    retry_with_groups: bool = added_setting(True, before=False)  # no victim label from single regions: search again with region_groups + expand_victims
    significance: float = 1e-3  # one-sided binomial p-value for a victim label
    min_candidates: int = 5  # fewest candidates a victim label needs
    clean_ratio: float = 3.0  # clean pairs per victim pair in the compact set
    epochs: int = 10  # fine-tuning passes over the compact set
    lr: float = 2e-5  # AdamW peak learning rate (cosine schedule)
    batch_size: int = 32  # fine-tuning batch (lowered to the set size if larger)
    tune: str = "all"  # which weights the repair fine-tunes: all | vision (the image tower only)
    inference_batch: int = 1024  # images per CLIP call in Algorithm 1
    seed: int = 0  # seeds the clean-pair sample, captions and the fine-tune
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        for name in ("max_region_fraction", "crop_confidence", "support_max", "significance", "transfer_min"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"OracleRepairConfig.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("fill_ring", "transfer_images", "min_candidates", "epochs", "batch_size", "inference_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"OracleRepairConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.tune not in ("all", "vision"):
            raise ValueError(f"OracleRepairConfig.tune must be 'all' or 'vision', got {self.tune!r}")
        if not self.group_min_drop > 0:
            raise ValueError(f"OracleRepairConfig.group_min_drop must be > 0, got {self.group_min_drop}")
        if self.clean_ratio < 0:
            raise ValueError(f"OracleRepairConfig.clean_ratio must be >= 0, got {self.clean_ratio}")
        if not self.lr > 0:
            raise ValueError(f"OracleRepairConfig.lr must be > 0, got {self.lr}")
