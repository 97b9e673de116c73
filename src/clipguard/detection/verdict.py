"""One calibrated verdict from every registered detector: ``backdoored``, ``clean`` or ``inconclusive``.

A detector's score has no threshold that holds across models (docs/results/detection.md: the
clean broad model collapses as far as a backdoor). :func:`scan` runs the detectors, then
calibrates on the user's own model in one of two ways (docs/methods.md, "The verdict"). Both
rest on Neural Cleanse's reverse step (Wang et al., S&P 2019): for K candidate targets (the
detectors' suspects, then a seeded sample of the other classes) the smallest working trigger is
inverted (:func:`~clipguard.detection.targeted.invert_targets`, one batch), with s_k its mask area.

* **self** (no reference): NC's anomaly index on log areas,

      index_k = (median_j log s_j - log s_k) / (1.4826 * max(MAD_j(log s_j), mad_floor))

  Deviation: log areas, not NC's raw L1 norms (areas are multiplicative); the MAD is floored
  (one inversion's run-to-run spread) so that a tight cluster of clean classes does not make any
  small one "anomalous"; K candidates (default 10), not every class. A target the model already
  reads clean shots of other classes as (share >= ``natural_limit``) needs no trigger: a class
  bias, reported "inconclusive" unless the index says backdoored.
* **reference** (``reference``: the clean base a fine-tune claims to come from): the same
  inversion, candidates and seed on the reference; a backdoor makes its target's trigger smaller
  on the suspect than on the base, a fine-tune's drift moves every class alike:

      r_k = log s_k(reference) - log s_k(suspect)
      index_k = (r_k - median_j r_j) / (1.4826 * max(MAD_j r_j, ratio_mad_floor))

  (with fewer than ``min_classes`` candidates the median is taken as 0). Each detector's
  trigger (inverted on the suspect) is also applied to both models: the transfer (a natural
  attractor's trigger works on the base too, a backdoor's does not). The self mode's verdict on
  the same suspect-side numbers is recorded beside it.

The suspected target is the candidate of the largest index: "backdoored" at ``index >=
backdoored_at`` (``reference_backdoored_at``), "clean" under ``clean_below``
(``reference_clean_below``), "inconclusive" between. In the reference mode a transfer gap (a
detector's trigger read as its target on a share of the suspect's shots of other classes minus
that share on the reference's) of at least ``gap_backdoored`` also calls it backdoored, towards
that detector's target, and one of at least ``gap_clean`` keeps it from "clean". :func:`decide` computes the verdict from a
calibration record alone, so thresholds can be refitted on recorded runs
(benchmarks/detection_zoo_plan.py); the values shipped and how they were found:
docs/results/detection.md.

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
from clipguard.data.fmnist import ImageSet
from clipguard.detection.base import DETECTORS, Finding, get_detector, zero_shot_head
from clipguard.detection.evidence import collapse_towards, natural_rates
from clipguard.detection.report import DetectionReport
from clipguard.detection.targeted import TargetedConfig, TargetedResult, invert_targets
from clipguard.models.clip import ClipModel
from clipguard.registry import RangeChecked

logger = logging.getLogger(__name__)

VERDICTS = ("backdoored", "clean", "inconclusive")


@dataclass
class VerdictConfig(RangeChecked):
    candidates: int = 10  # candidate targets (the detectors' suspects + seeded others)
    min_classes: int = 5  # self mode refuses fewer classes: the median and MAD of <= 4 sizes make any class "anomalous"
    backdoored_at: float = 2.0  # self: anomaly index at or above which the verdict is backdoored (NC's 2)
    clean_below: float = 0.4  # self: index under which the verdict is clean (between: inconclusive); under every backdoor's
    # index measured so far, as the self statistic does not separate them from clean models (docs/results/detection-zoo.md)
    mad_floor: float = 0.5  # self: least MAD of the log trigger areas (one inversion's run-to-run spread)
    natural_limit: float = 0.5  # self: share of clean other-class shots already read as the target: a class bias
    reference_backdoored_at: float = 3.0  # reference: anomaly index of the area ratio at or above which: backdoored
    reference_clean_below: float = 2.0  # reference: anomaly index of the area ratio under which: clean
    ratio_mad_floor: float = 0.1  # reference: least MAD of the log area ratios (same seeds on both models)
    gap_backdoored: float = 0.3  # reference: a detector's trigger read as its target this much more often on the suspect
    gap_clean: float = 0.2  # reference: every transfer gap under this (and the index under its bound): clean
    targeted: TargetedConfig = field(default_factory=TargetedConfig)  # the per-target inversion of both modes

    def __post_init__(self):
        for name, low, high in (("candidates", 3, 1000), ("min_classes", 3, 1000), ("backdoored_at", -100.0, 100.0),
                                ("clean_below", -100.0, 100.0), ("mad_floor", 0.0, 10.0), ("natural_limit", 0.0, 1.0),
                                ("reference_backdoored_at", -100.0, 100.0), ("reference_clean_below", -100.0, 100.0),
                                ("ratio_mad_floor", 0.0, 10.0), ("gap_backdoored", -1.0, 1.0), ("gap_clean", -1.0, 1.0)):
            self._check_range(name, low, high)
        for low, high in (("clean_below", "backdoored_at"), ("reference_clean_below", "reference_backdoored_at"),
                          ("gap_clean", "gap_backdoored")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"VerdictConfig: {low} ({getattr(self, low)}) must not exceed {high} "
                                 f"({getattr(self, high)})")


# ------------------------------------------------------------------ statistics (pure)
def robust_scores(values: list[float], floor: float = 0.0, centre: float | None = None) -> list[float]:
    """(x_k - median x) / (1.4826 * max(MAD x, floor)): how far above the others each value lies
    (``centre`` replaces the median when given).

    >>> [round(a, 2) for a in robust_scores([0.0, 0.1, 0.1, 0.2, 1.0])]
    [-0.67, 0.0, 0.0, 0.67, 6.07]
    """
    median = statistics.median(values) if centre is None else centre
    mad = max(statistics.median(abs(x - median) for x in values), floor, 1e-8)
    return [(x - median) / (1.4826 * mad) for x in values]


def anomaly_indices(sizes: list[float], mad_floor: float = 0.0) -> list[float]:
    """NC's anomaly index on log sizes, positive for a size under the median:
    (median log s - log s_k) / (1.4826 * max(MAD, mad_floor)).

    >>> [round(a, 2) for a in anomaly_indices([0.01, 0.1, 0.1, 0.2, 0.05], mad_floor=0.0)]
    [2.24, 0.0, 0.0, -0.67, 0.67]
    """
    return robust_scores([-math.log(max(s, 1e-8)) for s in sizes], mad_floor)


def candidate_targets(classes: tuple[str, ...], suspects: list[str], count: int, seed: int) -> list[str]:
    """The detectors' suspected targets (first, once each), then a seeded sample of the other classes, ``count`` in all.

    >>> candidate_targets(("a", "b", "c", "d"), ["c"], 3, 0)[0]
    'c'
    """
    chosen = list(dict.fromkeys(s for s in suspects if s in classes))[:count]
    rest = [c for c in classes if c not in chosen]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    return chosen + [rest[i] for i in order[: count - len(chosen)]]


def decide(calibration: dict, config: VerdictConfig) -> tuple[str, str | None, float, str | None]:
    """(verdict, suspected target, its index, class-bias note) from a calibration record's
    ``candidates`` alone (``area`` and ``natural`` per candidate; the reference mode also
    ``reference_area``): what :func:`scan` reports, and what a refit replays on recorded runs."""
    rows = calibration["candidates"]
    if calibration["mode"] == "self":
        indices = anomaly_indices([r["area"] for r in rows], config.mad_floor)
        low, high = config.clean_below, config.backdoored_at
    else:
        ratios = [math.log(max(r["reference_area"], 1e-8)) - math.log(max(r["area"], 1e-8)) for r in rows]
        indices = robust_scores(ratios, config.ratio_mad_floor, None if len(rows) >= config.min_classes else 0.0)
        low, high = config.reference_clean_below, config.reference_backdoored_at
    biased = ([k for k, r in enumerate(rows) if r["natural"] >= config.natural_limit]
              if calibration["mode"] == "self" else [])
    eligible = [k for k in range(len(rows)) if k not in biased] or list(range(len(rows)))
    best = max(eligible, key=lambda k: indices[k])
    index = indices[best]
    verdict = "backdoored" if index >= high else "clean" if index < low else "inconclusive"
    target = rows[best]["target_name"]
    gaps = [r for r in calibration.get("detectors", []) if r.get("gap") is not None]
    if calibration["mode"] == "reference" and gaps:  # the transfer: either kind of evidence can call it
        widest = max(gaps, key=lambda r: r["gap"])
        if widest["gap"] >= config.gap_backdoored and verdict != "backdoored":
            verdict, target = "backdoored", widest["target_name"]
        elif widest["gap"] >= config.gap_clean and verdict == "clean":
            verdict = "inconclusive"
    bias = None
    if biased:
        worst = max(biased, key=lambda k: rows[k]["natural"])
        bias = (f"the model reads {rows[worst]['natural']:.0%} of clean shots of other classes as "
                f"{rows[worst]['target_name']}, a class bias no trigger is needed for")
        verdict = "backdoored" if verdict == "backdoored" else "inconclusive"
    return verdict, target, index, bias


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
        if not shots.classes:
            raise ClipguardError("the reference calibration compares per-class triggers and the shots have no class "
                                 "names; give a labelled dataset")
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
        report = _reference_calibrated(clip, reference, shots, findings, config, seed, device, reference_name,
                                       (head, zero_shot_head(reference, shots)))
    report.seconds, report.head = time.perf_counter() - start, head
    return report


def _targeted(clip, shots, targets, config, seed, device, head) -> TargetedResult:
    return invert_targets(clip, shots, targets, TargetedConfig(**{**asdict(config.targeted), "seed": seed,
                                                                    "device": device}), head)


def _calibrated(mode: str, shots, findings, candidates: list[dict], extra: dict, config,
                result: TargetedResult) -> DetectionReport:
    """The report of either mode from its candidate rows: :func:`decide` gives the verdict."""
    calibration = {"mode": mode, **extra, "candidates": candidates}
    verdict, target, index, bias = decide(calibration, config)
    indices = (anomaly_indices([r["area"] for r in candidates], config.mad_floor) if mode == "self" else None)
    for k, row in enumerate(candidates):
        row["anomaly_index"] = round(indices[k], 3) if indices else row["anomaly_index"]
    best = next((k for k, row in enumerate(candidates) if row["target_name"] == target),
                max(range(len(candidates)), key=lambda k: candidates[k]["anomaly_index"]))
    high, low = ((config.backdoored_at, config.clean_below) if mode == "self"
                 else (config.reference_backdoored_at, config.reference_clean_below))
    calibration.update(anomaly_index=round(index, 3), target_name=target, backdoored_at=high, clean_below=low,
                       class_bias=bias, seconds=round(result.seconds, 2))
    if mode == "reference":
        calibration.update(gap_backdoored=config.gap_backdoored, gap_clean=config.gap_clean)
    return DetectionReport(verdict, target if verdict != "clean" else None, calibration, findings,
                           trigger=(result.masks[best], result.patterns[best]))


def _self_calibrated(clip, shots, findings, config, seed, device, head) -> DetectionReport:
    suspects = [f.target_name for f in findings if f.target_name]
    targets = candidate_targets(shots.classes, suspects, min(config.candidates, len(shots.classes)), seed)
    result = _targeted(clip, shots, targets, config, seed, device, head)
    natural = natural_rates(clip, shots, targets, head)
    candidates = [{"target_name": t, "area": round(s, 5), "reached": r, "success": round(a, 4), "natural": round(n, 4),
                   "coherence": round(c, 4)}
                  for t, s, r, a, n, c in zip(targets, result.sizes, result.reached, result.success, natural,
                                              result.coherence)]
    extra = {"statistic": "anomaly index of log trigger area (Neural Cleanse)", "mad_floor": config.mad_floor,
             "natural_limit": config.natural_limit}
    return _calibrated("self", shots, findings, candidates, extra, config, result)


def _reference_calibrated(clip, reference, shots, findings, config, seed, device, name, heads) -> DetectionReport:
    suspects = [f.target_name for f in findings if f.target_name]
    targets = candidate_targets(shots.classes, suspects, min(config.candidates, len(shots.classes)), seed)
    result = _targeted(clip, shots, targets, config, seed, device, heads[0])
    theirs = _targeted(reference, shots, targets, config, seed, device, heads[1])
    natural, reference_natural = natural_rates(clip, shots, targets, heads[0]), natural_rates(reference, shots, targets, heads[1])
    ratios = [math.log(max(b, 1e-8)) - math.log(max(a, 1e-8)) for a, b in zip(result.sizes, theirs.sizes)]
    indices = robust_scores(ratios, config.ratio_mad_floor, None if len(targets) >= config.min_classes else 0.0)
    candidates = [{"target_name": t, "area": round(a, 5), "reference_area": round(b, 5), "log_ratio": round(r, 4),
                   "anomaly_index": round(i, 3), "natural": round(n, 4), "reference_natural": round(m, 4),
                   "success": round(u, 4), "coherence": round(c, 4), "reference_coherence": round(d, 4)}
                  for t, a, b, r, i, n, m, u, c, d in zip(targets, result.sizes, theirs.sizes, ratios, indices, natural,
                                                          reference_natural, result.success, result.coherence,
                                                          theirs.coherence)]
    rows = []
    for mine in findings:
        row = {"detector": mine.detector, "suspect_score": round(mine.score, 4), "target_name": mine.target_name,
               "suspect_collapse": None, "reference_collapse": None, "gap": None}
        if mine.apply is not None or mine.text_key is not None:
            target, on_suspect = collapse_towards(clip, shots, mine, mine.target_name, heads[0])
            _, on_reference = collapse_towards(reference, shots, mine, target, heads[1])
            row.update(target_name=target, suspect_collapse=round(on_suspect, 4),
                       reference_collapse=round(on_reference, 4), gap=round(on_suspect - on_reference, 4))
        rows.append(row)
    gaps = [r["gap"] for r in rows if r["gap"] is not None]
    extra = {"reference": name, "statistic": "anomaly index of the log trigger-area ratio, reference over suspect",
             "ratio_mad_floor": config.ratio_mad_floor, "detectors": rows, "max_gap": max(gaps) if gaps else None,
             "reference_seconds": round(theirs.seconds, 2)}
    self_verdict, self_target, self_index, _ = decide({"mode": "self", "candidates": candidates}, config)
    extra["self"] = {"verdict": self_verdict, "target_name": self_target, "anomaly_index": round(self_index, 3)}
    return _calibrated("reference", shots, findings, candidates, extra, config, result)
