"""Oracle-guided repair as a registered defense: it learns from an unlabelled pool and rewrites
the suspect's weights (a repaired copy), so it writes a model directory with its report."""

from __future__ import annotations

from pathlib import Path

from clipguard.defenses.base import Pool, register
from clipguard.defenses.oracle_repair.config import OracleRepairConfig
from clipguard.defenses.oracle_repair.repair import oracle_repair, report_summary, write_repair_report
from clipguard.defenses.weights import WeightFinetune
from clipguard.models.clip import ClipModel


@register
class OracleRepair(WeightFinetune):
    """Algorithms 1 and 2 on ``pool``, then a fine-tune of a copy on the compact set (see repair.py)."""

    name = "oracle-repair"
    config_class = OracleRepairConfig
    data = "pool"

    def fit(self, clip: ClipModel, data: Pool) -> dict:
        self.model, self.report = oracle_repair(clip, data.images, self.config, self.class_names)
        self.report["pool"] = {k: v for k, v in data.info.items() if k != "triggered"}
        self.pool_images = data.images
        changed = sum(p.numel() for p in self.model.parameters()) if self.report["model_changed"] else 0
        return {**report_summary(self.report), "trainable_parameters": changed}

    def record(self, stats: dict) -> dict:
        return {"repair": report_summary(self.report)}

    def save(self, clip: ClipModel, directory: str | Path, stats: dict | None = None,
             source_dir: str | Path | None = None) -> Path:
        path = super().save(clip, directory, stats, source_dir)
        write_repair_report(self.report, self.pool_images, directory)
        return path

    def summary(self, stats: dict) -> str:
        return (f"oracle repair: {self.report['verdict']}; victim labels {self.report.get('victim_labels')}, "
                f"compact set {self.report.get('compact_set_size', 0)} pairs")
