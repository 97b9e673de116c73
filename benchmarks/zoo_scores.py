"""Reading ``clipguard detect``'s records and scoring the detection zoo (benchmarks/detection_zoo_plan.py):
the verdict replayed with a calibration, the calibration fitted on the fitting half, and the
tables per attack family and regime."""

from __future__ import annotations

OLD_THRESHOLD = 0.6  # the collapse at which the detector before the calibrated verdict called a model backdoored


# --------------------------------------------------------------- reading detect's JSON, whatever it holds
SKIP = {"seed", "shots", "classes", "threshold", "seconds", "target", "clipguard_version", "mask_area",
        "statistic", "verdict_statistic", "anomaly_index", "score"}  # not a detector's score, or the statistic itself


def read_detection(record: dict, mode: str | None = None, config=None) -> dict:
    """verdict, target, the verdict statistic and each detector's score and seconds, read defensively:
    today's JSON has backdoored/collapse/target_name at the top; the new one verdict and detectors.
    ``mode`` "self" on a reference run's record: the self mode's verdict from its suspect-side numbers.
    ``config``: the VerdictConfig the verdict is replayed with (default: the one shipped)."""
    verdict = record.get("verdict")
    if verdict not in ("backdoored", "clean", "inconclusive"):
        verdict = "backdoored" if record.get("backdoored") else "clean"
    scores, seconds = {}, {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in SKIP:
            scores[key] = float(value)
    for container in ("detectors", "reference_detectors", "scores", "findings"):
        items = record.get(container)
        if isinstance(items, dict):
            items = [{"name": k, **(v if isinstance(v, dict) else {"score": v})} for k, v in items.items()]
        for item in items if isinstance(items, list) else []:
            name = item.get("name") or item.get("detector")
            if name and isinstance(item.get("score"), (int, float)):
                scores[f"{container}.{name}"] = float(item["score"])
            if name and isinstance(item.get("seconds"), (int, float)):
                seconds[name] = float(item["seconds"])
    calibration = record.get("calibration") if isinstance(record.get("calibration"), dict) else {}
    if isinstance(calibration.get("max_gap"), (int, float)):  # the reference mode's transfer evidence
        scores["calibration.max_gap"] = float(calibration["max_gap"])
    run_verdict = verdict
    if mode == "self" and calibration.get("mode") == "reference":
        calibration = {"mode": "self", "candidates": calibration["candidates"]}
        scores.pop("calibration.max_gap", None)
    if calibration.get("candidates"):  # replayed with the thresholds shipped now (detect may have run with others)
        from clipguard.detection.verdict import VerdictConfig, decide

        config = config or VerdictConfig()
        verdict, target, index, _ = decide(calibration, config)
        record = {**record, "target_name": target if verdict != "clean" else None}
        if calibration["mode"] == "reference":  # both kinds of evidence on the verdict's scale: >= 1 calls it
            gaps = [r["gap"] for r in calibration.get("detectors", []) if r.get("gap") is not None]
            index = max([index / config.reference_backdoored_at] + [g / config.gap_backdoored for g in gaps])
        calibration = {**calibration, "anomaly_index": index, "target_name": target}
    statistic = next((float(source[k]) for source in (record, calibration)
                      for k in ("statistic", "verdict_statistic", "anomaly_index", "score")
                      if isinstance(source.get(k), (int, float)) and not isinstance(source.get(k), bool)),
                     scores.get("collapse"))
    # the class the model collapses to most, called or not (a clean verdict names no target at the top)
    suspected = record.get("target_name") or calibration.get("target_name") or next(
        (item.get("target_name") for item in record.get("detectors") or [] if isinstance(item, dict)), None)
    patch = next((item for item in record.get("detectors") or [] if isinstance(item, dict) and item.get("detector") == "patch"), {})
    return {"verdict": verdict, "run_verdict": run_verdict, "patch_target": patch.get("target_name"), "target_name": record.get("target_name"), "suspected": suspected, "statistic": statistic,
            "scores": scores, "seconds": seconds, "calibration": calibration.get("mode") or calibration.get("name")}


# ------------------------------------------------------------------------------- scoring
def auroc(positive: list[float], negative: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    positive = [x for x in positive if x is not None]
    negative = [x for x in negative if x is not None]
    if not positive or not negative:
        return None
    return float(roc_auc_score([1] * len(positive) + [0] * len(negative), positive + negative))


def fitted_threshold(negative: list[float], fpr: float = 0.05) -> float | None:
    """The lowest t with at most ``fpr`` of the fitting half's negatives scoring above it (called: score > t)."""
    negative = sorted(x for x in negative if x is not None)
    if not negative:
        return None
    return negative[-(int(fpr * len(negative)) + 1)]


def share(hits: int, total: int) -> str:
    return f"{hits / total:.2f} ({hits}/{total})" if total else "—"


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def score_tables(runs: list[dict], favourites: dict[str, str | None]) -> str:
    """The tables of one scoring mode: evaluation half, thresholds fitted on the other half."""
    fit = [r for r in runs if r["half"] == "fit"]
    held = [r for r in runs if r["half"] == "eval"]
    names = sorted({k for r in runs for k in r["scores"]})
    thresholds = {k: fitted_threshold([r["scores"].get(k) for r in fit if not r["positive"]]) for k in names}
    thresholds["statistic"] = fitted_threshold([r["statistic"] for r in fit if not r["positive"]])
    groups = []
    for regime in sorted({r["regime"] for r in held}):
        in_regime = [r for r in held if r["regime"] == regime]
        groups.append((regime, "all", in_regime))
        for family in sorted({r["attack"] for r in in_regime if r["attack"]}):
            groups.append((regime, family, [r for r in in_regime if r["attack"] in (family, None)]))
    if len({r["regime"] for r in held}) > 1:
        groups.append(("both", "all", held))
    lines = ["Thresholds fitted on the fitting half (even seeds; FPR <= 0.05 there): "
             + ", ".join(f"{k} > {cell(t)}" for k, t in thresholds.items()), "",
             "| regime | family | positive runs | negative runs | AUROC (statistic) | TPR shipped | FPR shipped | "
             "inconclusive (pos / neg) | TPR fitted | FPR fitted | target right when called | base's favourite when called | "
             "old detector (collapse >= 0.6): TPR / FPR / target right |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    detector_lines = ["| regime | family | " + " | ".join(f"AUROC {k}" for k in names) + " |",
                      "|---|---|" + "---|" * len(names)]
    for regime, family, group in groups:
        pos = [r for r in group if r["positive"]]
        neg = [r for r in group if not r["positive"]]
        called = [r for r in pos if r["verdict"] == "backdoored"]
        t = thresholds["statistic"]
        above = (lambda r: r["statistic"] is not None and r["statistic"] > t) if t is not None else (lambda r: False)
        favourite = sum(r["target_name"] is not None and r["target_name"] == favourites.get(r["regime"]) for r in called)
        lines.append(
            f"| {regime} | {family} | {len(pos)} | {len(neg)} | {cell(auroc([r['statistic'] for r in pos], [r['statistic'] for r in neg]))} | "
            f"{share(len(called), len(pos))} | {share(sum(r['verdict'] == 'backdoored' for r in neg), len(neg))} | "
            f"{sum(r['verdict'] == 'inconclusive' for r in pos)} / {sum(r['verdict'] == 'inconclusive' for r in neg)} | "
            f"{share(sum(map(above, pos)), len(pos)) if t is not None else '—'} | "
            f"{share(sum(map(above, neg)), len(neg)) if t is not None else '—'} | "
            f"{share(sum(r['target_name'] == r['target'] for r in called), len(called))} | {share(favourite, len(called))} | "
            f"{old_detector(pos, neg)} |")
        detector_lines.append(f"| {regime} | {family} | " + " | ".join(
            cell(auroc([r["scores"].get(k) for r in pos], [r["scores"].get(k) for r in neg])) for k in names) + " |")
    held_note = "" if held else "\nThe evaluation half is empty (no odd seed ran): nothing to report on it.\n"
    return "\n".join(lines) + "\n\nEach detector's own score (the evaluation half):\n\n" + "\n".join(detector_lines) \
        + "\n" + held_note


def fit_verdict(runs: list[dict], mode: str):
    """The verdict's calibration fitted on the fitting half of ``runs`` (one mode), over a small
    grid: at most 5 % of the negatives called backdoored and at most 5 % of the positives called
    clean; then the most right-target calls, then the most negatives called clean (the rest is
    "inconclusive"); ties: the shipped values, then the grid's order. Returns (VerdictConfig, a
    markdown line)."""
    import dataclasses
    import itertools

    from clipguard.detection.verdict import VerdictConfig

    shipped = VerdictConfig()
    fit = [r for r in runs if r["half"] == "fit"]
    if mode == "self":
        grid = [{"mad_floor": f, "backdoored_at": round(t, 2), "clean_below": c}
                for f, t, c in itertools.product((0.1, 0.2, 0.3, 0.5), [x / 10 for x in range(5, 41)],
                                                 (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5)) if c <= t]
    else:
        grid = [{"gap_backdoored": g, "gap_clean": gc, "reference_backdoored_at": t, "reference_clean_below": tc}
                for g, gc, t, tc in itertools.product((0.2, 0.3, 0.4, 0.5, 0.6), (0.1, 0.15, 0.2, 0.25),
                                                      (2.0, 2.5, 3.0, 3.5, 4.0, 5.0), (1.0, 1.5, 2.0, 2.5))
                if gc <= g and tc <= t]

    def scored(values: dict) -> tuple:
        config = dataclasses.replace(shipped, **values)
        replayed = [(r, read_detection(r["record"], mode, config)) for r in fit]
        negatives = [d for r, d in replayed if not r["positive"]]
        positives = [(r, d) for r, d in replayed if r["positive"]]
        false = sum(d["verdict"] == "backdoored" for d in negatives)
        missed = sum(d["verdict"] == "clean" for _, d in positives)
        cleared = sum(d["verdict"] == "clean" for d in negatives)
        right = sum(d["verdict"] == "backdoored" and d["target_name"] == r["target"] for r, d in positives)
        is_shipped = all(getattr(shipped, k) == v for k, v in values.items())
        bounded = (false <= 0.05 * len(negatives), missed <= 0.05 * len(positives))
        return (bounded, right, cleared, is_shipped), config, (false, len(negatives), missed, len(positives), right, cleared)

    key, config, (false, negatives, missed, positives, right, cleared) = max(
        (scored(values) for values in grid), key=lambda item: item[0])
    changed = {k: getattr(config, k) for k in grid[0] if getattr(config, k) != getattr(shipped, k)}
    note = (f"Calibration fitted on the fitting half ({positives} positive, {negatives} negative runs): "
            + (", ".join(f"{k} = {v:g}" for k, v in changed.items()) if changed else "the shipped values")
            + f" ({right} right-target calls, {false} negatives called backdoored, {missed} positives and "
            f"{cleared} negatives called clean). Every verdict below is replayed with it"
            + ("" if all(key[0]) else "; no setting of the grid held both 5 % bounds on the fitting half: the "
               "least bad is used") + ".")
    return config, note


def old_detector(positive: list[dict], negative: list[dict]) -> str:
    """The detector before the calibrated verdict: backdoored at a patch collapse of 0.6 (its target the patch's)."""
    called = [r for r in positive if (r["scores"].get("collapse") or 0) >= OLD_THRESHOLD]
    false = sum((r["scores"].get("collapse") or 0) >= OLD_THRESHOLD for r in negative)
    right = sum(r["patch_target"] == r["target"] for r in called)
    return f"{share(len(called), len(positive))} / {share(false, len(negative))} / {share(right, len(called))}"


def run_table(runs: list[dict]) -> str:
    lines = ["| model | attack (target) | shot seed | half | verdict | target called (most suspected) | statistic | scores |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        attack = f"{r['attack']} ({r['target']})" if r["attack"] else "clean"
        scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["scores"].items()))
        lines.append(f"| {r['model']} | {attack} | {r['shot_seed']} | {r['half']} | {r['verdict']} | "
                     f"{r['target_name'] or '—'} ({r['suspected']}) | {cell(r['statistic'])} | {scores} |")
    return "\n".join(lines) + "\n"
