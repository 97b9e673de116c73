"""What :func:`~clipguard.detection.verdict.scan` returns: the verdict, its calibration, every
detector's finding, and the figure of the inverted triggers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import Finding, zero_shot_head
from clipguard.models.clip import ClipModel


@dataclass
class DetectionReport:
    """What :func:`scan` found: the verdict, its calibration and every detector's :class:`Finding`."""

    verdict: str  # backdoored | clean | inconclusive
    target_name: str | None  # the suspected target (None: none stands out or none is named)
    calibration: dict  # {"mode": "self" | "reference", thresholds, statistic values}
    findings: list[Finding]  # one per detector run on the suspect
    trigger: tuple[torch.Tensor, torch.Tensor] | None = None  # self mode: the suspected target's (mask, pattern)
    seconds: float = 0.0
    head: torch.Tensor | None = None  # (C, D) the suspect's zero-shot head the detectors classified with

    @property
    def backdoored(self) -> bool:
        return self.verdict == "backdoored"

    def _patch(self) -> Finding | None:
        return next((f for f in self.findings if f.detector == "patch"), None)

    def line(self) -> str:
        """The verdict in one line, with the calibration that gave it."""
        c = self.calibration
        bound = (f" >= {c['backdoored_at']:.1f}" if self.backdoored else f" < {c['clean_below']:.1f}"
                 if self.verdict == "clean" else f" between {c['clean_below']:.1f} and {c['backdoored_at']:.1f}")
        if c["mode"] == "self":
            how = f"calibrated on the model's own classes: anomaly index {c['anomaly_index']:.1f}{bound}"
            if c.get("class_bias"):
                how += f"; {c['class_bias']}"
            if self.verdict == "inconclusive":
                how += "; --reference MODEL (the model it was fine-tuned from) can decide"
        else:
            row = max(c["candidates"], key=lambda r: r["anomaly_index"])
            how = (f"calibrated against the reference {c['reference']}: the smallest trigger towards "
                   f"{row['target_name']} covers {row['area']:.1%} of the image on the suspect, "
                   f"{row['reference_area']:.1%} on the reference, anomaly index {row['anomaly_index']:.1f} "
                   f"(backdoored at {c['backdoored_at']:.1f}, clean under {c['clean_below']:.1f})")
            gaps = [r for r in c.get("detectors", []) if r.get("gap") is not None]
            if gaps:
                wide = max(gaps, key=lambda r: r["gap"])
                how += (f"; the {wide['detector']} trigger is read as {wide['target_name']} on "
                        f"{wide['suspect_collapse']:.0%} of the suspect's shots of other classes, "
                        f"{wide['reference_collapse']:.0%} of the reference's (backdoored at a gap of "
                        f"{c['gap_backdoored']:.2f}, clean under {c['gap_clean']:.2f})")
        if self.backdoored:
            return f"backdoored: suspected target {self.target_name} ({how})"
        subject = f" (most suspicious target {self.target_name})" if self.target_name else ""
        return f"{self.verdict}{subject} ({how})"

    def detector_lines(self) -> list[str]:
        """One line per detector: score, target, and in the reference mode the reference's score and the transfer."""
        rows = {r["detector"]: r for r in self.calibration.get("detectors", [])}
        lines = []
        for finding in self.findings:
            text = f"{finding.detector}: score {finding.score:.3f}, target {finding.target_name or '-'}"
            row = rows.get(finding.detector)
            if row and row.get("gap") is not None:
                text += (f"; its trigger read as {row['target_name']}: suspect {row['suspect_collapse']:.2f}, "
                         f"reference {row['reference_collapse']:.2f}")
            lines.append(text)
        return lines

    def as_dict(self) -> dict:
        """JSON-ready: verdict, target_name, calibration, detectors; ``backdoored``, ``collapse`` and
        ``mask_area`` (the patch detector's) as older detection records had them."""
        patch = self._patch()
        return {"verdict": self.verdict, "target_name": self.target_name, "backdoored": self.backdoored,
                "collapse": patch.details.get("collapse", round(patch.score, 4)) if patch else None,
                "mask_area": patch.details.get("mask_area") if patch else None,
                "calibration": self.calibration, "detectors": [f.as_dict() for f in self.findings],
                "seconds": round(self.seconds, 2)}


def save_report_figure(report: DetectionReport, clip: ClipModel, shots: ImageSet, path, examples: int = 5) -> None:
    """PNG, one row per image-side trigger (each detector's, and the self calibration's for the
    suspected target): the trigger on a grey image, then ``examples`` triggered shots titled with
    what ``clip`` reads them as (red: the row's target)."""
    import matplotlib.pyplot as plt

    from clipguard.detection.inversion import apply_trigger
    from clipguard.eval.plots import save_figure

    rows = [(f"{f.detector}", f.apply, f.target_name) for f in report.findings if f.apply is not None]
    if report.trigger is not None:
        mask, pattern = report.trigger
        rows.append(("self calibration", lambda x: apply_trigger(x, mask, pattern), report.calibration["target_name"]))
    picks = torch.linspace(0, len(shots) - 1, examples).round().long()
    images = shots.float_images(picks)  # (E, 3, H, W)
    texts = (zero_shot_head(clip, shots) if report.head is None else report.head).to(clip.device)
    fig, axes = plt.subplots(max(1, len(rows)), examples + 1, figsize=(1.5 * (examples + 1), 1.8 * max(1, len(rows))),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, (label, apply, target) in enumerate(rows):
        with torch.no_grad():
            grey = apply(torch.full((1,) + images.shape[1:], 0.5))[0]  # (3, H, W)
            triggered = apply(images)  # (E, 3, H, W)
            predictions = (clip.encode_image(triggered.to(clip.device), normalize=True) @ texts.T).argmax(-1).cpu()
        axes[row, 0].imshow(grey.permute(1, 2, 0).clamp(0, 1).numpy())
        axes[row, 0].set_title(f"{label}\n(target {target or '-'})", fontsize=7)
        for col in range(examples):
            name = shots.classes[int(predictions[col])]
            axes[row, col + 1].imshow(triggered[col].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[row, col + 1].set_title(f"read as {name}", fontsize=7, color="crimson" if name == target else "black")
    fig.suptitle(report.line(), fontsize=7, wrap=True)
    fig.tight_layout()
    save_figure(fig, path)
