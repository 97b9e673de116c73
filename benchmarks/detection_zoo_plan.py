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

from zoo_scores import fit_verdict, read_detection, run_table, score_tables, share

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
    done = Path(args.work) / "detect"
    detections = sum(not (done / mode / f"{m.name.replace('/', '_')}-shots{args.shots}-s{seed}.json").is_file()
                     for m in models for seed in args.shot_seeds
                     for mode in ["self" if m.seed is None or "reference" not in args.modes else "reference"])
    detect_minutes = detections * args.detect_minutes
    return (f"{len(to_build)} of {len(models) - sum(m.seed is None for m in models)} models to build "
            f"(~{attack_minutes:.0f} CPU min at {ATTACK_MINUTES * scale + (1.0 if args.quick else 0.0):.1f} min each), "
            f"up to {detections} detect runs to make (~{detect_minutes:.0f} min at {args.detect_minutes:g} min each): "
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
