"""The attack table: every attack at the given poison rates on the built-in model.

For each (attack, rate): CA, ASR, PA of the backdoored model, the clean model's ASR under the
same trigger (chance level), the trigger fit and fine-tune seconds the model records, and the
attack command's wall time (evaluation included). Backdoored models are written under
--out and reused when their eval.json exists, so an interrupted table resumes.

    python benchmarks/attack_table.py --rates 0.03 0.01 0.003 --out runs/attacks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _tables import markdown_table
from clipguard.attacks import ATTACKS
from clipguard.keys import config_hash, trigger_settings_key


def _trigger_key(attack: str, settings: dict | None) -> str | None:
    """What identifies a trigger's settings: their cache key (:func:`clipguard.keys.trigger_settings_key`),
    None when they were not recorded."""
    return None if settings is None else trigger_settings_key(attack, settings)


def _clean_trigger_key(attack: str, path: Path) -> str | None:
    """The key of the trigger settings a clean-model evaluation JSON was made with."""
    return _trigger_key(attack, json.loads(path.read_text()).get("attack", {}).get("trigger"))


def model_directory(out: Path, attack: str, rate: float, extra: list[str]) -> Path:
    """OUT/ATTACK-RATE, and with --extra flags a folder of their own (their hash): a folder made
    with other flags is never reused."""
    suffix = f"-{config_hash({'extra': extra})}" if extra else ""
    return out / f"{attack}-{rate:g}{suffix}"


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attacks", nargs="*", default=sorted(ATTACKS))
    parser.add_argument("--rates", nargs="*", type=float, default=[0.03])
    parser.add_argument("--target", default="bag")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/attacks")
    parser.add_argument("--extra", nargs="*", default=[], help="more flags for 'clipguard attack'")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for attack in args.attacks:
        clean_json = out / f"clean-{attack}.json"
        default_trigger = _trigger_key(attack, asdict(ATTACKS.get_class(attack).config_class(seed=args.seed)))
        # missing, or made with another trigger
        if not clean_json.exists() or _clean_trigger_key(attack, clean_json) != default_trigger:
            run(["clipguard", "evaluate", "--model", "builtin", "--attack", attack, "--target", args.target,
                 "--seed", str(args.seed), "--json", str(clean_json)])
        clean = json.loads(clean_json.read_text())
        for rate in args.rates:
            model_dir = model_directory(out, attack, rate, args.extra)
            if not (model_dir / "eval.json").exists():
                start = time.perf_counter()
                run(["clipguard", "attack", "--attack", attack, "--target", args.target, "--poison-rate", str(rate),
                     "--seed", str(args.seed), "--out", str(model_dir), *args.extra])
                (model_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
            result = json.loads((model_dir / "eval.json").read_text())
            record = json.loads((model_dir / "config.json").read_text())["attack"]
            seconds = float((model_dir / "wall_seconds.txt").read_text())
            if _trigger_key(attack, record["trigger"]) != _clean_trigger_key(attack, clean_json):
                sys.exit(f"{model_dir} was made with other trigger settings than the clean-model evaluation "
                         f"{clean_json}: the chance level would not be this trigger's; use another --out")
            rows.append((attack, rate, result, clean, record, seconds))
    print()
    cells = []
    for attack, rate, r, clean, record, seconds in rows:
        ca, asr, pa = r["clean_accuracy"], r["attack_success_rate"], r["poisoned_accuracy"]
        cells.append([attack, f"{100 * rate:g}%", f"{100 * ca['value']:.2f}",
                      f"{100 * asr['value']:.2f} ({asr['hits']}/{asr['total']})", f"{100 * pa['value']:.2f}",
                      f"{100 * clean['attack_success_rate']['value']:.2f}",
                      f"{record['trigger_seconds']:.0f} + {record['finetune_seconds']:.0f} s", f"{seconds:.0f} s"])
    print(markdown_table(["attack", "rate", "CA", "ASR (hits/total)", "PA", "clean-model ASR", "trigger + fine-tune",
                          "wall"], cells))
    print("\nASR and PA count triggered test images of non-target classes only (target-class images excluded).")


if __name__ == "__main__":
    sys.exit(main())
