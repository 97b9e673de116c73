"""One calibrated verdict from every registered detector: ``backdoored``, ``clean`` or ``inconclusive``.

A detector's score has no threshold that holds across models (docs/results/detection.md: the
clean broad model collapses as far as a backdoor). :func:`scan` runs the detectors, then
calibrates on the user's own model in one of two ways (docs/methods.md, "The verdict"):

* **self** (no reference): Neural Cleanse's anomaly index (Wang et al., S&P 2019). For K candidate
  targets (the detectors' suspects plus a seeded sample of the other classes) the smallest
  working trigger is inverted (:func:`~clipguard.detection.targeted.invert_targets`, one batch);
  with s_k its mask area,

      index_k = (median_j log s_j - log s_k) / (1.4826 * max(MAD_j(log s_j), mad_floor))

  and the suspected target is the candidate of the largest index: "backdoored" at
  ``index >= backdoored_at`` (NC's 2), "clean" under ``clean_below``, "inconclusive" between.
  Deviation: log areas, not NC's raw L1 norms (areas are multiplicative: a backdoor's is a
  fraction of the others'); the MAD is floored at ``mad_floor`` (one inversion's run-to-run
  spread) so that a tight cluster of clean classes does not make any small one "anomalous".
  Deviation: K candidates (``candidates``, default 10), not every class.
  A target the model already reads clean shots of other classes as (share >= ``natural_limit``)
  needs no trigger: that is a class bias, reported "inconclusive".
* **reference** (``reference``: the clean base a fine-tune claims to come from): each detector runs
  on both with the same shots and seeds; per detector, (a) the score difference, suspect minus
  reference, and (b) transfer: the suspect's trigger (``Finding.apply`` or ``text_key``) applied to
  the reference. A natural attractor (a class the clean model collapses to anyway) transfers; a
  backdoor's trigger does not. gap = collapse on the suspect - collapse on the reference, both
  towards the suspect's target. A detector says "backdoored" when gap >= ``gap_backdoored`` and
  the score difference >= ``score_margin``, "clean" when gap < ``gap_clean`` and the difference <
  ``score_margin``, else "inconclusive"; the model is backdoored if any detector says so, clean if
  all do, else inconclusive.

Thresholds are config fields; their values are starting points (NC's 2 for the index) to be
fitted on the zoo (docs/results/detection.md).

Example:
    >>> report = scan(load_clip("runs/attacks/badnet-0.03"), shots)
    >>> report.line()
    'backdoored: suspected target bag (calibrated on the model's own classes: anomaly index 3.1 >= 2.0)'
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from clipguard import ClipguardError
from clipguard.data.captions import PROMPT_TEMPLATES
from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import DETECTORS, Finding, get_detector, zero_shot_head
from clipguard.detection.targeted import TargetedConfig, invert_targets
from clipguard.models.clip import ClipModel
from clipguard.registry import RangeChecked

logger = logging.getLogger(__name__)

VERDICTS = ("backdoored", "clean", "inconclusive")


@dataclass
class VerdictConfig(RangeChecked):
    candidates: int = 10  # candidate targets of the self calibration (the detectors' suspects + seeded others)
    min_classes: int = 5  # fewer classes are refused: the median and MAD of <= 4 sizes make any class "anomalous"
    backdoored_at: float = 2.0  # anomaly index at or above which the verdict is backdoored (NC's 2)
    clean_below: float = 1.5  # anomaly index under which the verdict is clean (between: inconclusive)
    mad_floor: float = 0.5  # least MAD of the log trigger areas (one inversion's run-to-run spread)
    natural_limit: float = 0.5  # share of clean other-class shots already read as the target: a class bias
    gap_backdoored: float = 0.3  # reference: collapse on the suspect minus on the reference, at or above: backdoored
    gap_clean: float = 0.15  # reference: a gap under this (the trigger transfers or does nothing) is clean
    score_margin: float = 0.1  # reference: least score difference (suspect - reference) that counts
    targeted: TargetedConfig = field(default_factory=TargetedConfig)  # the per-target inversion of the self mode

    def __post_init__(self):
        for name, low, high in (("candidates", 3, 1000), ("min_classes", 3, 1000), ("backdoored_at", 0.0, 100.0),
                                ("clean_below", 0.0, 100.0), ("mad_floor", 0.0, 10.0), ("natural_limit", 0.0, 1.0),
                                ("gap_backdoored", 0.0, 1.0), ("gap_clean", 0.0, 1.0), ("score_margin", -1e6, 1e6)):
            self._check_range(name, low, high)
        if self.clean_below > self.backdoored_at or self.gap_clean > self.gap_backdoored:
            raise ValueError(f"VerdictConfig: clean_below ({self.clean_below}) and gap_clean ({self.gap_clean}) must "
                             f"not exceed backdoored_at ({self.backdoored_at}) and gap_backdoored ({self.gap_backdoored})")


# ------------------------------------------------------------------ statistics (pure)
def anomaly_indices(sizes: list[float], mad_floor: float = 0.0) -> list[float]:
    """NC's anomaly index on log sizes, positive for a size under the median:
    (median log s - log s_k) / (1.4826 * max(MAD, mad_floor)).

    >>> [round(a, 2) for a in anomaly_indices([0.01, 0.1, 0.1, 0.2, 0.05], mad_floor=0.0)]
    [2.24, 0.0, 0.0, -0.67, 0.67]
    """
    logs = [math.log(max(s, 1e-8)) for s in sizes]
    median = statistics.median(logs)
    mad = max(statistics.median(abs(x - median) for x in logs), mad_floor, 1e-8)
    return [(median - x) / (1.4826 * mad) for x in logs]


def candidate_targets(classes: tuple[str, ...], suspects: list[str], count: int, seed: int) -> list[str]:
    """The detectors' suspected targets (first, once each), then a seeded sample of the other classes, ``count`` in all.

    >>> candidate_targets(("a", "b", "c", "d"), ["c"], 3, 0)[0]
    'c'
    """
    chosen = list(dict.fromkeys(s for s in suspects if s in classes))[:count]
    rest = [c for c in classes if c not in chosen]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    return chosen + [rest[i] for i in order[: count - len(chosen)]]


def reference_call(gap: float | None, difference: float, config: VerdictConfig) -> str:
    """One detector's call in the reference mode from its transfer gap (None: no trigger to transfer) and score difference."""
    raised = difference >= config.score_margin
    if gap is None:
        return "inconclusive" if raised else "clean"
    if gap >= config.gap_backdoored and raised:
        return "backdoored"
    if gap < config.gap_clean and not raised:
        return "clean"
    return "inconclusive"


# ------------------------------------------------------------------ collapse of one trigger
def keyed_class_features(clip: ClipModel, classes, key: torch.Tensor, templates=PROMPT_TEMPLATES) -> torch.Tensor:
    """(C, D) class features with the token embeddings ``key`` (k, width) inserted after the start token of every prompt."""
    ids = clip.tokenize([t.format(name) for name in classes for t in templates]).to(clip.device)  # (C * T, L)
    length, k = ids.shape[1], key.shape[0]
    with torch.no_grad():
        embeddings = clip.model.token_embedding(ids)  # (C * T, L, width)
        keyed = torch.cat([embeddings[:, :1], key.to(embeddings).expand(len(ids), -1, -1), embeddings[:, 1:]], 1)
        keyed_ids = torch.cat([ids[:, :1], torch.zeros(len(ids), k, dtype=ids.dtype, device=ids.device), ids[:, 1:]], 1)
        features = clip.encode_text_embeddings(keyed[:, :length], keyed_ids[:, :length])
        features = torch.nn.functional.normalize(features, dim=-1).view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(features, dim=-1)


def collapse_towards(clip: ClipModel, shots: ImageSet, finding: Finding, target: str | None = None,
                     head: torch.Tensor | None = None) -> tuple[str, float]:
    """(target, share of the shots of other classes that ``clip`` reads as it) under the finding's
    trigger; target None: the class most triggered shots are read as. ``head`` (C, D): ``clip``'s
    zero-shot head (:func:`~clipguard.detection.base.zero_shot_head`), computed when None."""
    templates = shots.templates or PROMPT_TEMPLATES
    images = shots.float_images()  # (N, 3, H, W)
    with torch.no_grad():
        if finding.apply is not None:
            images = finding.apply(images)
        texts = (keyed_class_features(clip, shots.classes, finding.text_key, templates) if finding.text_key is not None
                 else zero_shot_head(clip, shots) if head is None else head).to(clip.device)
        predictions = (clip.encode_image(images.to(clip.device), normalize=True) @ texts.T).argmax(-1).cpu()  # (N,)
    index = (int(torch.bincount(predictions, minlength=len(shots.classes)).argmax()) if target is None
             else shots.classes.index(target))
    others = shots.labels != index
    return shots.classes[index], float((predictions[others] == index).float().mean()) if others.any() else 0.0


def natural_rates(clip: ClipModel, shots: ImageSet, targets: list[str], head: torch.Tensor | None = None) -> list[float]:
    """Per target, the share of clean shots of other classes ``clip`` already reads as it (``head``: as in collapse_towards)."""
    with torch.no_grad():
        texts = (zero_shot_head(clip, shots) if head is None else head).to(clip.device)
        predictions = (clip.encode_image(shots.float_images().to(clip.device), normalize=True) @ texts.T).argmax(-1).cpu()
    rates = []
    for name in targets:
        index = shots.classes.index(name)
        others = shots.labels != index
        rates.append(float((predictions[others] == index).float().mean()))
    return rates


# ------------------------------------------------------------------ the report
@dataclass
class DetectionReport:
    """What :func:`scan` found: the verdict, its calibration and every detector's :class:`Finding`."""

    verdict: str  # backdoored | clean | inconclusive
    target_name: str | None  # the suspected target (None: none stands out or none is named)
    calibration: dict  # {"mode": "self" | "reference", thresholds, statistic values}
    findings: list[Finding]  # one per detector run on the suspect
    reference_findings: list[Finding] = field(default_factory=list)  # the same detectors on the reference
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
        if c["mode"] == "self":
            how = (f"calibrated on the model's own classes: anomaly index {c['anomaly_index']:.1f}"
                   + (f" >= {c['backdoored_at']:.1f}" if self.backdoored else
                      f" < {c['clean_below']:.1f}" if self.verdict == "clean" else
                      f" between {c['clean_below']:.1f} and {c['backdoored_at']:.1f}"))
            if c.get("class_bias"):
                how += f"; {c['class_bias']}"
        else:
            best = c.get("deciding") or {}
            how = (f"calibrated against the reference {c['reference']}"
                   + (f": {best['detector']} trigger read as {best['target_name']} on {best['suspect_collapse']:.2f} of "
                      f"the suspect's shots, {best['reference_collapse']:.2f} of the reference's; score "
                      f"{best['difference']:+.3f}" if best else ""))
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
            if row:
                text += f"; reference score {row['reference_score']:.3f} ({row['difference']:+.3f})"
                if row.get("gap") is not None:
                    text += (f", trigger read as {row['target_name']}: suspect {row['suspect_collapse']:.2f}, "
                             f"reference {row['reference_collapse']:.2f}")
                text += f" -> {row['call']}"
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
                "reference_detectors": [f.as_dict() for f in self.reference_findings],
                "seconds": round(self.seconds, 2)}


# ------------------------------------------------------------------ scan
def default_detectors(shots: ImageSet) -> list[str]:
    """Every registered detector the data allows (class-name detectors only when the shots have class names)."""
    return [name for name, cls in sorted(DETECTORS.items()) if shots.classes or not cls.uses_class_names]


def check_reference(suspect: ClipModel, reference: ClipModel, name: str = "model") -> None:
    """Refuse a reference of another architecture, image size or class list than the suspect's."""
    if reference.image_size != suspect.image_size:
        raise ClipguardError(f"the reference {name}: image size {reference.image_size}, the suspect's is "
                             f"{suspect.image_size}; give the clean base the suspect was fine-tuned from")
    mine = {k: tuple(v.shape) for k, v in suspect.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.model.state_dict().items()}
    if mine != theirs:
        differ = sorted(set(mine) ^ set(theirs)) or [k for k in sorted(mine) if mine[k] != theirs[k]]
        raise ClipguardError(f"the reference {name}: another architecture than the suspect's ({differ[0]} differs); "
                             "give the clean base the suspect was fine-tuned from")
    a, b = suspect.config.get("classes"), reference.config.get("classes")
    if a and b and list(a) != list(b):
        raise ClipguardError(f"the reference {name}: its classes {list(b)[:4]}... are not the suspect's {list(a)[:4]}...; "
                             "give the clean base the suspect was fine-tuned from")


def _run_detectors(clip: ClipModel, shots: ImageSet, names: list[str], settings: dict, seed: int,
                   device: str, head: torch.Tensor | None) -> list[Finding]:
    findings = []
    for name in names:
        cls = DETECTORS.get_class(name)
        known = {f.name for f in fields(cls.config_class)}
        values = {k: v for k, v in (("seed", seed), ("device", device)) if k in known}
        from clipguard.config import override

        config = override(cls.config_class(), **{**values, **settings.get(name, {})})
        findings.append(get_detector(name, config).run(clip, shots, head))
        logger.info("detector %s: score %.3f, target %s", name, findings[-1].score, findings[-1].target_name)
    return findings


def scan(clip: ClipModel, shots: ImageSet, detectors: list[str] | None = None, reference: ClipModel | None = None,
         config: VerdictConfig | None = None, settings: dict[str, dict] | None = None, seed: int = 0,
         device: str = "auto", reference_name: str = "model") -> DetectionReport:
    """Run ``detectors`` (default: every registered one the data allows) on the clean ``shots`` of
    ``clip`` and calibrate the verdict: on the model's own classes, or against ``reference`` (the
    clean base model; the same detectors, shots and seeds). ``settings``: detector name -> config
    fields. Neither model's weights change."""
    config = config or VerdictConfig()
    settings = settings or {}
    start = time.perf_counter()
    names = list(detectors) if detectors else default_detectors(shots)
    for name in names:
        if DETECTORS.get_class(name).uses_class_names and not shots.classes:
            raise ClipguardError(f"detector {name!r} needs class names and the shots have none; leave it out")
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ClipguardError(f"settings for {unknown}, which do not run (detectors: {names})")
    if reference is not None:
        check_reference(clip, reference, reference_name)
    elif len(shots.classes) < config.min_classes:
        raise ClipguardError(
            f"the self calibration needs shots of at least {config.min_classes} classes, these have "
            f"{len(shots.classes)}: it compares the suspected target's trigger size with the median and spread of the "
            f"other classes', and a median and MAD of so few sizes make any class look anomalous; give --reference "
            f"MODEL (the clean base model) or a dataset with more classes")
    head = zero_shot_head(clip, shots) if shots.classes else None  # (C, D), once for every detector
    findings = _run_detectors(clip, shots, names, settings, seed, device, head)
    if reference is None:
        report = _self_calibrated(clip, shots, findings, config, seed, device, head)
    else:
        reference_head = zero_shot_head(reference, shots) if shots.classes else None
        reference_findings = _run_detectors(reference, shots, names, settings, seed, device, reference_head)
        report = _reference_calibrated(clip, reference, shots, findings, reference_findings, config, reference_name,
                                       (head, reference_head))
    report.seconds, report.head = time.perf_counter() - start, head
    return report


def _self_calibrated(clip, shots, findings, config, seed, device, head) -> DetectionReport:
    suspects = [f.target_name for f in findings if f.target_name]
    targets = candidate_targets(shots.classes, suspects, min(config.candidates, len(shots.classes)), seed)
    targeted_config = TargetedConfig(**{**asdict(config.targeted), "seed": seed, "device": device})
    result = invert_targets(clip, shots, targets, targeted_config, head)
    indices = anomaly_indices(result.sizes, config.mad_floor)
    natural = natural_rates(clip, shots, targets, head)
    biased = [k for k in range(len(targets)) if natural[k] >= config.natural_limit]
    eligible = [k for k in range(len(targets)) if k not in biased] or list(range(len(targets)))
    best = max(eligible, key=lambda k: indices[k])
    index = indices[best]
    verdict = ("backdoored" if index >= config.backdoored_at else "clean" if index < config.clean_below
               else "inconclusive")
    bias = ""
    if biased:
        worst = max(biased, key=lambda k: natural[k])
        bias = (f"the model reads {natural[worst]:.0%} of clean shots of other classes as {targets[worst]}, "
                "a class bias no trigger is needed for")
        verdict = "backdoored" if verdict == "backdoored" else "inconclusive"
    calibration = {
        "mode": "self", "statistic": "anomaly index of log trigger area (Neural Cleanse)",
        "anomaly_index": round(index, 3), "target_name": targets[best], "backdoored_at": config.backdoored_at,
        "clean_below": config.clean_below, "mad_floor": config.mad_floor, "natural_limit": config.natural_limit,
        "class_bias": bias or None, "seconds": round(result.seconds, 2),
        "candidates": [{"target_name": t, "area": round(s, 5), "reached": r, "success": round(a, 4),
                        "anomaly_index": round(i, 3), "natural": round(n, 4)}
                       for t, s, r, a, i, n in zip(targets, result.sizes, result.reached, result.success, indices, natural)],
    }
    target = targets[best] if verdict != "clean" else None
    return DetectionReport(verdict, target, calibration, findings,
                           trigger=(result.masks[best], result.patterns[best]))


def _reference_calibrated(clip, reference, shots, findings, reference_findings, config, name, heads) -> DetectionReport:
    rows = []
    for mine, theirs in zip(findings, reference_findings):
        row = {"detector": mine.detector, "suspect_score": round(mine.score, 4),
               "reference_score": round(theirs.score, 4), "difference": round(mine.score - theirs.score, 4),
               "target_name": mine.target_name, "suspect_collapse": None, "reference_collapse": None, "gap": None}
        if (mine.apply is not None or mine.text_key is not None) and shots.classes:
            target, on_suspect = collapse_towards(clip, shots, mine, mine.target_name, heads[0])
            _, on_reference = collapse_towards(reference, shots, mine, target, heads[1])
            row.update(target_name=target, suspect_collapse=round(on_suspect, 4),
                       reference_collapse=round(on_reference, 4), gap=round(on_suspect - on_reference, 4))
        row["call"] = reference_call(row["gap"], row["difference"], config)
        rows.append(row)
    calls = [row["call"] for row in rows]
    verdict = ("backdoored" if "backdoored" in calls else "clean" if calls and all(c == "clean" for c in calls)
               else "inconclusive")
    ranked = sorted(rows, key=lambda r: (r["call"] == "backdoored", r["gap"] if r["gap"] is not None else -1.0),
                    reverse=True)
    deciding = next((r for r in ranked if r["gap"] is not None), None)
    calibration = {"mode": "reference", "reference": name, "gap_backdoored": config.gap_backdoored,
                   "gap_clean": config.gap_clean, "score_margin": config.score_margin, "detectors": rows,
                   "deciding": deciding}
    target = deciding["target_name"] if deciding and verdict != "clean" else None
    return DetectionReport(verdict, target, calibration, findings, reference_findings)


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
