"""The papers' defender data in the light regime: RVPT, VPT, CBPT and the linear probe on 1,600 shots
per class (16,000 images: RVPT's 16 shots x 1,000 ImageNet classes) at the papers' epochs (RVPT/VPT:
50 at batch 32, i.e. 25,000 steps), beside the 16-shot default and a 10-epoch RVPT.

Backdoors the clean model with ``recipes/builtin-light.yaml`` (one ``clipguard attack`` per
attack), then runs every (attack, job) as its own ``clipguard defend`` process, ``--parallel`` at
a time, each scored on ``fmnist-val``. All of them are the CLI exactly as a user runs it; this
script only schedules them and gathers each ``eval.json``. A job still running at ``--deadline``
seconds is stopped and listed as unfinished with the last progress line of its log, so a
time-boxed run (a lent GPU) still returns what finished.

    python benchmarks/defender_data.py --model builtin-broad --work runs/defender-data \\
        --device cuda --parallel 14 --deadline 520

Writes ``--work``/summary.json and summary.md; logs under ``--work``/logs/. A rerun over the same
``--work`` skips every attack and defense whose ``eval.json`` is there, and an attack stopped at the
deadline continues from its last checkpoint (``clipguard attack --resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from _tables import markdown_table

RECIPE = "recipes/builtin-light.yaml"
VAL = "fmnist-val"
# name -> (method, shots per class, --set items)
JOBS = {
    "linear-probe-16": ("linear-probe", 16, []),
    "rvpt-16": ("rvpt", 16, []),
    "rvpt-1600-e10": ("rvpt", 1600, ["epochs=10"]),
    "rvpt-1600-e50": ("rvpt", 1600, ["epochs=50"]),
    "vpt-1600-e50": ("vpt", 1600, ["epochs=50"]),
    "cbpt-1600": ("cbpt", 1600, []),
    "linear-probe-1600": ("linear-probe", 1600, []),
}
# longest first, so a deadline cuts the short ones least
ORDER = ("rvpt-1600-e50", "vpt-1600-e50", "cbpt-1600", "rvpt-1600-e10", "linear-probe-1600", "rvpt-16",
         "linear-probe-16")


def clipguard(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipguard.cli", *args]


def attack_command(model: str, attack: str, seed: int, device: str, out: Path, extra: list[str]) -> list[str]:
    return clipguard("attack", "--config", RECIPE, "--model", model, "--attack", attack,
                     "--captions", "fmnist-web:plain=0.7", "--dataset", VAL, "--seed", str(seed),
                     "--device", device, "--workers", "0", "--out", str(out), "--resume", *extra)


def defend_command(suspect: Path, job: str, seed: int, device: str, out: Path, extra: list[str]) -> list[str]:
    method, shots, settings = JOBS[job]
    sets = [item for setting in settings for item in ("--set", setting)]
    return clipguard("defend", "--model", str(suspect), "--method", method, "--shots", str(shots), *sets,
                     "--dataset", VAL, "--seed", str(seed), "--device", device, "--workers", "0",
                     "--out", str(out), *extra)


def last_progress(log: Path) -> str:
    """The last tqdm state or line of a log (what an unfinished job had reached)."""
    if not log.is_file():
        return ""
    text = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()
    return text[-1][-200:] if text else ""


def run_all(tasks: list[tuple[str, list[str], Path, Path]], parallel: int, stop_at: float, env: dict) -> dict:
    """Run (name, command, log, done_file) tasks, ``parallel`` at a time, until ``stop_at``
    (time.monotonic()). Returns name -> {"seconds", "returncode"} or {"unfinished": last progress}."""
    pending, running, status = list(tasks), {}, {}
    while pending or running:
        while pending and len(running) < parallel and time.monotonic() < stop_at:
            name, command, log, done = pending.pop(0)
            if done.is_file():
                status[name] = {"seconds": None, "returncode": 0, "reused": True}
                continue
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as handle:
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            running[name] = (process, time.monotonic(), log)
            print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is not None:
                status[name] = {"seconds": round(time.monotonic() - started, 1), "returncode": process.returncode}
                print(f"[{time.strftime('%H:%M:%S')}] done {name} rc={process.returncode} "
                      f"{status[name]['seconds']} s: {last_progress(log)}", flush=True)
                del running[name]
        if time.monotonic() >= stop_at:
            for name, (process, started, log) in running.items():
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()
                status[name] = {"unfinished": last_progress(log), "seconds": round(time.monotonic() - started, 1)}
            for name, *_ in pending:
                status[name] = {"unfinished": "not started"}
            break
        time.sleep(1)
    return status


def metrics(eval_json: Path) -> dict | None:
    if not eval_json.is_file():
        return None
    result = json.loads(eval_json.read_text())
    row = {"ca": round(100 * result["clean_accuracy"]["value"], 2),
           "ca_counts": f"{result['clean_accuracy']['correct']}/{result['clean_accuracy']['total']}"}
    if "attack_success_rate" in result:
        asr = result["attack_success_rate"]
        row.update(asr=round(100 * asr["value"], 2), asr_counts=f"{asr['hits']}/{asr['total']}")
    stats_file = eval_json.parent / "config.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text()).get("stats", {})
        for key in ("seconds", "steps", "peak_memory_mb"):
            if key in stats:
                row[key] = stats[key]
    return row


def table(summary: dict) -> str:
    cells = []
    for attack, rows in summary["attacks"].items():
        for job, row in rows.items():
            if row.get("asr") is None:
                cells.append([attack, job, row.get("unfinished", row.get("error", "no result")), "", "", "", ""])
                continue
            cells.append([attack, job, f"{row['asr']} ({row['asr_counts']})", f"{row['ca']} ({row['ca_counts']})",
                          row.get("steps", ""), row.get("seconds", ""), row.get("process_seconds", "")])
    headers = ["attack", "job", "ASR (counts)", "CA (counts)", "steps", "fit s", "process s"]
    return markdown_table(headers, cells) + "\n"


def _process(status: dict, name: str) -> dict:
    entry = status.get(name, {"unfinished": "not run (no backdoored model)"})
    out = {"process_seconds": entry.get("seconds")}
    if "unfinished" in entry:
        out["unfinished"] = "unfinished: " + re.sub(r"\s+", " ", entry["unfinished"])
    elif entry.get("returncode"):
        out["error"] = f"exit {entry['returncode']}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin-broad", help="the clean model to backdoor")
    parser.add_argument("--work", default="runs/defender-data")
    parser.add_argument("--attacks", nargs="+", default=["badnet", "badclip"])
    parser.add_argument("--jobs", nargs="+", default=list(ORDER), choices=list(JOBS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", type=int, default=1, help="processes at a time (one GPU can hold many)")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; stop what still runs then")
    parser.add_argument("--attack-args", default="", help="more flags for every attack (last wins), e.g. '--pairs 2000'")
    parser.add_argument("--defend-args", default="", help="more flags for every defense (last wins), e.g. '--shots 2'")
    args = parser.parse_args()
    start, work = time.monotonic(), Path(args.work)
    stop_at = start + args.deadline
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # every output directory, by (attack, job); job "none" is the backdoored model itself
    outputs = {(a, job): work / "models" / a if job == "none" else work / "defenses" / a / job
               for a in args.attacks for job in ("none", *args.jobs)}
    names = {(a, job): f"attack:{a}" if job == "none" else f"{a}:{job}" for a, job in outputs}

    def task(a: str, job: str, command: list[str]) -> tuple[str, list[str], Path, Path]:
        log = work / "logs" / (f"attack-{a}.log" if job == "none" else f"{a}-{job}.log")
        return names[a, job], command, log, outputs[a, job] / "eval.json"

    status = run_all([task(a, "none", attack_command(args.model, a, args.seed, args.device, outputs[a, "none"],
                                                     args.attack_args.split())) for a in args.attacks],
                     args.parallel, stop_at, env)
    status.update(run_all([task(a, job, defend_command(outputs[a, "none"], job, args.seed, args.device,
                                                       outputs[a, job], args.defend_args.split()))
                           for job in args.jobs for a in args.attacks if (outputs[a, "none"] / "eval.json").is_file()],
                          args.parallel, stop_at, env))
    summary = {"model": args.model, "recipe": RECIPE, "dataset": VAL, "seed": args.seed, "device": args.device,
               "wall_seconds": round(time.monotonic() - start, 1), "attacks": {}}
    for (a, job), out in outputs.items():
        summary["attacks"].setdefault(a, {})[job] = {**(metrics(out / "eval.json") or {}), **_process(status, names[a, job])}
    work.mkdir(parents=True, exist_ok=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (work / "summary.md").write_text(table(summary))
    print(table(summary), flush=True)


if __name__ == "__main__":
    main()
