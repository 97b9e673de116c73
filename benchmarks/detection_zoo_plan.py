"""The honest detection zoo: build it with ``clipguard attack``, score it with ``clipguard detect``.

Positives: every attack (``--attacks``), in two regimes, at ``--attack-seeds`` (2 by default):
  * ``default``: the default attack recipe on the built-in model (``--model builtin``);
  * ``light``: ``recipes/builtin-light.yaml`` on the broad built-in model (``--broad MODEL``; the
    regime is skipped, with a message, when it is not given or not there).
Each (attack, seed, regime) gets its target from a rotation over eight classes (``TARGETS``), so
the targets spread over the classes and ``bag`` is an eighth of the full plan's positives. A
backdoor counts only when it took (ASR on ``fmnist-val`` >= ``--min-asr``, read from the eval.json
``clipguard attack`` writes); the others are listed in the manifest and left out of the scores.
Negatives: clean fine-tunes (``attack --poison-rate 0``) with each regime's recipe at
``--finetune-seeds`` (5 by default), and the clean base model of each regime.

The verdict statistic: self mode, the anomaly index; reference mode, max(index /
reference_backdoored_at, widest transfer gap / gap_backdoored), the verdict's own scale (at least
1: backdoored). Every model is scored by ``clipguard detect --seed S`` (a subprocess: its JSON beside ``--out``
is read, whatever detectors it holds) for each of ``--shot-seeds``; with ``--modes self
reference`` also with ``--reference BASE`` (the regime's base model). Scores per attack family
and regime are reported on the evaluation half of the zoo: the models of odd attack / fine-tune
seeds (the base models: their odd shot seeds); thresholds fitted on the even half. Reported:
AUROC of each detector's score and of the verdict statistic, TPR and FPR at the shipped verdict
and at the fitted threshold, target right among the calls, and the share of calls whose target
is the clean base model's own most-collapsing class (the mode over its shot seeds of the class
detect suspects most, called or not): a target that is only the base model's favourite is a guess.

Everything lives under ``--work`` (models/, detect/) and is reused when there, so a rerun
resumes; an interrupted fine-tune continues with ``--resume``. ``--plan-only`` prints the plan
and its estimated CPU time; ``--quick`` shrinks the attack recipe for a pilot of the plumbing
(recorded in the output; its backdoors are not the zoo's).

    python benchmarks/detection_zoo_plan.py --work runs/zoo --broad builtin-broad --plan-only
    python benchmarks/detection_zoo_plan.py --work runs/zoo --broad builtin-broad \\
        --modes self reference --doc docs/results/detection-zoo.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ATTACKS = ["badclip", "badnet", "badnet-lc", "blended", "issba", "sig", "trojvqa", "wanet"]
TARGETS = ["sandal", "trousers", "pullover", "sneaker", "bag", "dress", "ankle boot", "coat"]
REGIMES = ["default", "light"]
BUILD_FAMILIES = ["badnet", "wanet", "trojvqa", "sig", "blended", "issba", "badnet-lc", "badclip"]  # unlike families first
LIGHT_RECIPE = "recipes/builtin-light.yaml"
LIGHT_CAPTIONS = "fmnist-web:plain=0.7"
EVAL_DATASET = "fmnist-val"
# the pilot's recipe, the demo's (BadNet ASR 97.79 %, README): 300 of 2,000 pairs poisoned, 10 epochs
# (poison_rate: positives only); at 5 epochs BadNet and Blended mostly did not take (detection-zoo.md)
QUICK = {"pairs": 2000, "epochs": 10, "poison_rate": 0.15}
FULL = {"pairs": 10000, "epochs": 5, "poison_rate": 0.03}  # the default recipe's and builtin-light.yaml's
# CPU minutes on 2 cores (docs/results/attacks.md: 5-15 min per attack; detection-zoo.md's pilot: 5-6 min per
# detect run with every detector, under a load of 4-5)
ATTACK_MINUTES, DETECT_MINUTES = 10.0, 5.0
OLD_THRESHOLD = 0.6  # the collapse at which the detector before the calibrated verdict called a model backdoored


@dataclass
class Model:
    regime: str  # default | light
    attack: str | None  # None: clean (a fine-tune, or the base model itself)
    target: str | None
    seed: int | None  # attack / fine-tune seed; None: the base model
    path: str  # model directory (or the base model's spec)
    base: str  # the regime's clean base model
    status: str = "planned"  # planned | built | failed
    asr: float | None = None  # % on fmnist-val, positives only
    took: bool | None = None  # a positive whose ASR reached --min-asr (None: a negative)
    note: str = ""

    @property
    def name(self) -> str:
        if self.seed is None:
            return f"{self.regime}/base"
        return f"{self.regime}/{self.attack or 'clean'}" + (f"-{self.target.replace(' ', '_')}" if self.target else "") \
            + f"-s{self.seed}"



def target_for(attack: str, seed: int, regime: str) -> str:
    """The rotation: neighbouring attacks, seeds and regimes get different targets."""
    return TARGETS[(ATTACKS.index(attack) + 3 * seed + REGIMES.index(regime)) % len(TARGETS)]


def plan(args) -> list[Model]:
    bases = {"default": args.model, "light": args.broad}
    models = []
    for regime in args.regimes:
        base = bases[regime]
        if base is None or (not Path(base).exists() and not base.startswith("builtin")):
            print(f"skipping the {regime} regime: its base model {base or '(--broad not given)'} is not there "
                  "(train it with `clipguard train-builtin --config recipes/builtin-broad.yaml`)", file=sys.stderr)
            continue
        root = Path(args.work) / "models"
        for attack in args.attacks:
            for seed in args.attack_seeds:
                target = target_for(attack, seed, regime)
                m = Model(regime, attack, target, seed, "", base)
                m.path = str(root / m.name)
                models.append(m)
        for seed in args.finetune_seeds:
            m = Model(regime, None, None, seed, "", base)
            m.path = str(root / m.name)
            models.append(m)
        models.append(Model(regime, None, None, None, base, base, status="built"))
    return models


def build_order(m: Model) -> tuple:
    """Seed by seed, both regimes, the clean fine-tunes first, then the attacks, unlike trigger
    families first: a zoo stopped part-way still has both halves (even and odd seeds), both
    regimes, negatives and several families."""
    kind = 1 + BUILD_FAMILIES.index(m.attack) if m.attack else 0
    return (m.seed is None, m.seed or 0, kind, REGIMES.index(m.regime))


def attack_command(m: Model, args) -> list[str]:
    command = [args.clipguard, "attack", "--model", m.base, "--seed", str(m.seed), "--dataset", EVAL_DATASET,
               "--device", args.device, "--out", m.path]
    if m.regime == "light":
        command += ["--config", LIGHT_RECIPE, "--captions", LIGHT_CAPTIONS]
    if m.attack:
        command += ["--attack", m.attack, "--target", m.target]
        if args.quick:
            command += ["--poison-rate", str(QUICK["poison_rate"])]
    else:
        command += ["--poison-rate", "0"]
    if args.quick or args.epochs:
        recipe = recipe_of_args(args)
        command += ["--pairs", str(recipe["pairs"]), "--epochs", str(recipe["epochs"])]
    if Path(m.path + ".run").exists():
        command.append("--resume")  # an interrupted fine-tune continues from its checkpoint
    return command


def recipe_of_args(args) -> dict:
    """The attack recipe of this run: QUICK or FULL, with --epochs."""
    recipe = dict(QUICK if args.quick else FULL)
    recipe["epochs"] = args.epochs or recipe["epochs"]
    return recipe


def recipe_of(path: str) -> tuple | None:
    """(pairs, epochs, poison_rate) a model directory was made with (None: not a clipguard attack output)."""
    config = json.loads((Path(path) / "config.json").read_text())
    record = config.get("attack") or config.get("finetune")
    if not record:
        return None
    return record["pairs"], record["train"]["epochs"], record["poison_rate"]


def build(m: Model, args) -> None:
    """Make the model unless its directory is there (made with the same recipe); read its ASR from
    the eval.json attack wrote."""
    recipe = recipe_of_args(args)
    wanted = (recipe["pairs"], recipe["epochs"], recipe["poison_rate"] if m.attack else 0)
    if m.seed is not None and (Path(m.path) / "config.json").is_file() and recipe_of(m.path) != wanted:
        m.status, m.note = "failed", f"made with (pairs, epochs, rate) {recipe_of(m.path)}, not {wanted}: use another --work"
        return
    if m.seed is not None and not (Path(m.path) / "config.json").is_file():
        if args.detect_only:  # another invocation builds it
            return
        command = attack_command(m, args)
        log = Path(args.work) / "logs" / (m.name.replace("/", "_") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print("$ " + shlex.join(command), flush=True)
        with log.open("w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            m.status, m.note = "failed", f"exit {done.returncode}; see {log}"
            return
    m.status = "built"
    evaluation = Path(m.path) / "eval.json"
    if m.attack and evaluation.is_file():
        record = json.loads(evaluation.read_text())
        asr = record.get("attack_success_rate", {}).get("value")
        m.asr = None if asr is None else round(100 * asr, 2)
    if m.attack:
        m.took = m.asr is not None and m.asr >= args.min_asr


def detect_runs(models: list[Model], args) -> list[tuple[Model, int, str]]:
    """One detect run per (model, shot seed): ``--reference BASE`` when the reference mode is asked
    for (its record holds the suspect-side numbers the self mode decides on, so the self verdict
    is replayed from it, equal to a run without --reference), the self mode alone otherwise and
    for the base models."""
    mode = "reference" if "reference" in args.modes else "self"
    return [(m, seed, "self" if m.seed is None else mode) for m in models if m.status == "built" and m.took is not False
            for seed in args.shot_seeds]


def detect(m: Model, seed: int, mode: str, args) -> dict | None:
    """``clipguard detect``'s JSON for one run (made now unless already there)."""
    out = Path(args.work) / "detect" / mode / f"{m.name.replace('/', '_')}-shots{args.shots}-s{seed}.png"
    record = out.with_suffix(".json")
    if not record.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [args.clipguard, "detect", "--model", m.path, "--shots", str(args.shots), "--seed", str(seed),
                   "--device", args.device, "--out", str(out)]
        if mode == "reference":
            command += ["--reference", m.base]
        print("$ " + shlex.join(command), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"  failed (exit {done.returncode}): {done.stderr.strip()[-300:]}", file=sys.stderr)
            return None
        print(f"  {time.perf_counter() - start:.0f} s: {done.stdout.strip().splitlines()[-1]}", flush=True)
    return json.loads(record.read_text())


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
    lines = [f"Thresholds fitted on the fitting half (even seeds; FPR <= 0.05 there): "
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
    """The verdict's calibration fitted on the fitting half of ``runs`` (one mode): over a small
    grid, the most right-target calls among the positives with at most 5 % of the negatives called
    (ties: the shipped values, then the grid's order). Returns (VerdictConfig, a markdown line)."""
    import dataclasses
    import itertools

    from clipguard.detection.verdict import VerdictConfig

    shipped = VerdictConfig()
    fit = [r for r in runs if r["half"] == "fit"]
    if mode == "self":
        grid = [{"mad_floor": f, "backdoored_at": round(t, 2), "clean_below": round(max(0.0, t - 0.5), 2)}
                for f, t in itertools.product((0.1, 0.2, 0.3, 0.5), [x / 10 for x in range(5, 41)])]
    else:
        grid = [{"gap_backdoored": g, "gap_clean": round(g - 0.1, 2), "reference_backdoored_at": t,
                 "reference_clean_below": t - 1.0}
                for g, t in itertools.product((0.2, 0.3, 0.4, 0.5, 0.6), (2.0, 2.5, 3.0, 3.5, 4.0, 5.0))]

    def scored(values: dict) -> tuple:
        config = dataclasses.replace(shipped, **values)
        replayed = [(r, read_detection(r["record"], mode, config)) for r in fit]
        negatives = [d for r, d in replayed if not r["positive"]]
        false = sum(d["verdict"] == "backdoored" for d in negatives)
        right = sum(d["verdict"] == "backdoored" and d["target_name"] == r["target"] for r, d in replayed if r["positive"])
        is_shipped = all(getattr(shipped, k) == v for k, v in values.items())
        return (false <= 0.05 * len(negatives), right, is_shipped), config, false, len(negatives), right

    results = [scored(values) for values in grid]
    best = max(results, key=lambda item: item[0])
    key, config, false, negatives, right = best
    positives = sum(r["positive"] for r in fit)
    changed = {k: getattr(config, k) for k in grid[0] if getattr(config, k) != getattr(shipped, k)}
    note = (f"Calibration fitted on the fitting half ({positives} positive, {negatives} negative runs): "
            + (", ".join(f"{k} = {v:g}" for k, v in changed.items()) if changed else "the shipped values") +
            f" ({right} right-target calls, {false} negatives called). Every verdict below is replayed with it"
            + ("" if key[0] else "; no setting of the grid kept the fitting half's negatives at 5 %: the least bad is used") + ".")
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


def manifest_table(models: list[Model]) -> str:
    lines = ["| model | regime | attack | target | seed | ASR on fmnist-val (%) | took | status | path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        took = "" if m.took is None else ("yes" if m.took else "no")
        lines.append(f"| {m.name} | {m.regime} | {m.attack or 'clean'} | {m.target or ''} | "
                     f"{'' if m.seed is None else m.seed} | {'' if m.asr is None else f'{m.asr:.2f}'} | {took} | "
                     f"{m.status}{' (' + m.note + ')' if m.note else ''} | `{m.path}` |")
    return "\n".join(lines) + "\n"


def estimate(models: list[Model], args) -> str:
    recipe = recipe_of_args(args)
    scale = recipe["pairs"] * recipe["epochs"] / (FULL["pairs"] * FULL["epochs"])
    to_build = [m for m in models if m.seed is not None and not (Path(m.path) / "config.json").is_file()]
    attack_minutes = len(to_build) * (ATTACK_MINUTES * scale + (1.0 if args.quick else 0.0))
    detections = len(models) * len(args.shot_seeds) * len(args.modes) - \
        sum(m.seed is None for m in models) * len(args.shot_seeds) * ("reference" in args.modes)
    detect_minutes = detections * args.detect_minutes
    return (f"{len(to_build)} of {len(models) - sum(m.seed is None for m in models)} models to build "
            f"(~{attack_minutes:.0f} CPU min at {ATTACK_MINUTES * scale + (1.0 if args.quick else 0.0):.1f} min each), "
            f"up to {detections} detect runs (~{detect_minutes:.0f} min at {args.detect_minutes:g} min each): "
            f"~{(attack_minutes + detect_minutes) / 60:.1f} h on 2 idle cores, one job at a time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the models, detections and manifest (reused)")
    parser.add_argument("--model", default="builtin", help="the default regime's clean base model")
    parser.add_argument("--broad", default="builtin-broad", help="the light regime's clean base model (the broad built-in model)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=REGIMES)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=ATTACKS)
    parser.add_argument("--attack-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--finetune-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--shot-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=["self", "reference"], default=["self"],
                        help="reference: also `detect --reference BASE` (the regime's base model)")
    parser.add_argument("--min-asr", type=float, default=50.0, help="a backdoor took at this ASR (%%) or above")
    parser.add_argument("--quick", action="store_true", help=f"a pilot of the plumbing: {QUICK}")
    parser.add_argument("--epochs", type=int, help="fine-tune epochs of every model (default: the recipe's)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and its estimated time")
    parser.add_argument("--build-only", action="store_true", help="build the models and write the manifest; no detect run")
    parser.add_argument("--detect-only", action="store_true",
                        help="build nothing: detect on the models already built (beside a --build-only invocation)")
    parser.add_argument("--jobs", type=int, default=1, help="commands run at once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--detect-minutes", type=float, default=DETECT_MINUTES, help="for the estimate")
    parser.add_argument("--clipguard", default=str(Path(sys.executable).with_name("clipguard")))
    parser.add_argument("--doc", help="markdown file for the manifest and tables (default WORK/detection-zoo.md)")
    args = parser.parse_args()
    models = plan(args)
    if args.plan_only:
        for m in models:
            what = "reuse" if m.seed is None or (Path(m.path) / "config.json").is_file() else shlex.join(attack_command(m, args))
            print(f"{m.name}: {what}")
        positives = [m for m in models if m.attack]
        print(f"{len(positives)} positives over {len({m.target for m in positives})} targets "
              f"(bag {share(sum(m.target == 'bag' for m in positives), len(positives))}), "
              f"{len(models) - len(positives)} negatives; shot seeds {args.shot_seeds}, modes {args.modes}")
        print(estimate(models, args))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda m: build(m, args), sorted(models, key=build_order)))
    if not args.detect_only:
        (work / "manifest.json").write_text(json.dumps([asdict(m) for m in models], indent=1))
    if args.build_only:
        print(manifest_table(models))
        return
    todo = detect_runs(models, args)
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda run: detect(*run, args), todo))
    runs = []
    for (m, seed, mode), record in zip(todo, records):
        if record is None:
            continue
        half = (m.seed if m.seed is not None else seed) % 2
        for shown in dict.fromkeys([mode, "self"]):  # a reference run also gives the self verdict
            if shown in args.modes:
                runs.append({"model": m.name, "regime": m.regime, "attack": m.attack, "target": m.target,
                             "seed": m.seed, "shot_seed": seed, "mode": shown, "half": "eval" if half else "fit",
                             "positive": m.attack is not None, "record": record, **read_detection(record, shown)})
    (work / "runs.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "record"} for r in runs], indent=1))
    favourites = {}
    for regime in {m.regime for m in models}:
        named = [r["suspected"] for r in runs if r["regime"] == regime and r["seed"] is None and r["mode"] == "self"]
        favourites[regime] = Counter(named).most_common(1)[0][0] if named else None
    text = [f"# The detection zoo{' — a PILOT of the plumbing (--quick), not the zoo' if args.quick else ''}", "",
            "```bash", "python " + shlex.join(sys.argv), "```", ""]
    if args.quick:
        text += [f"`--quick`: attack recipe {recipe_of_args(args)} (pairs, epochs, poison rate of the positives): a pilot that "
                 "proves the script end to end. Its numbers say nothing about the detectors.", ""]
    text += [f"{time.perf_counter() - start:.0f} s for this invocation (what --work held was reused). The base models' "
             "most collapsing class (the mode over their shot seeds of the class detect suspects most, called or not): " + ", ".join(f"{k} `{v}`" for k, v in sorted(favourites.items())), "",
             "## Manifest", "", manifest_table(models)]
    missed = [m for m in models if m.took is False]
    text += ["Backdoors that did not take (left out of the scores): "
             + (", ".join(f"{m.name} ({m.asr:.2f} %)" if m.asr is not None else m.name for m in missed) or "none"), ""]
    for mode in args.modes:
        chosen = [r for r in runs if r["mode"] == mode]
        if not chosen:
            continue
        config, note = fit_verdict(chosen, mode)
        chosen = [{**r, **read_detection(r["record"], mode, config)} for r in chosen]
        text += [f"## Scores: `{mode}` mode", "", note, "", score_tables(chosen, favourites), "### Runs", "",
                 run_table(chosen)]
    doc = Path(args.doc or work / "detection-zoo.md")
    doc.write_text("\n".join(text))
    print(f"wrote {doc}, {work / 'manifest.json'} and {work / 'runs.json'}")


if __name__ == "__main__":
    main()
