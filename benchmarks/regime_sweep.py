"""Which backdoor injection gives the papers' regime on the built-in model? A sweep of the attack's
corpus, lr, epochs and poison rate, each point scored on the validation split (``fmnist-val``:
5,000 train images no attack corpus or shot holds) without a defense and through a 16-shot
linear probe on clean features.

The papers' pattern: no-defense ASR >= 80 % for BadNet and Blended, the linear probe leaving
<= 10 % on them and >= 80 % on BadCLIP, CA within 1 point of the clean model.

    python benchmarks/regime_sweep.py --work runs/regime --point badnet,fmnist-web,1e-4,5,0.03
    (point = attack,captions,lr,epochs,poison_rate[,pairs][|FIELD=V;FIELD=V trigger settings];
    repeatable; done points are skipped; --model backdoors another clean model, e.g. the broad
    built-in one of recipes/builtin-broad.yaml, in a --work of its own; --device cuda on a GPU)

Each point's backdoored model is kept under --work/models/ for the later defenses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clipguard import pipeline
from clipguard.attacks import AttackConfig
from clipguard.config import override
from clipguard.data import DefenderData
from clipguard.eval.evaluate import write_json

VAL = "fmnist-val"


def score(defended, trigger, target: str, record: list | None = None) -> dict:
    result = pipeline.evaluate(defended, trigger=trigger, target=target, dataset=VAL, progress=False)
    if record is not None:
        record.append(result)
    return {"ca": round(100 * result["clean_accuracy"]["value"], 2),
            "asr": round(100 * result["attack_success_rate"]["value"], 2)}


def run_point(point: str, work: Path, shots: int, seed: int, model: str = "builtin", device: str = "cpu") -> dict:
    from clipguard.attacks import get_trigger_class
    from clipguard.config import parse_assignments

    head, _, trigger_items = point.partition("|")
    attack, captions, lr, epochs, rate, *rest = head.split(",")
    trigger_settings = parse_assignments(get_trigger_class(attack).config_class,
                                         trigger_items.split(";") if trigger_items else [])
    pairs = int(rest[0]) if rest else 10000
    config = override(AttackConfig(attack=attack, poison_rate=float(rate), pairs=pairs, seed=seed),
                      **{"train.lr": float(lr), "train.epochs": int(epochs), "train.device": device})
    clip = pipeline.load_model(model, device=device)
    start = time.perf_counter()
    suspect, trigger, record = pipeline.backdoor(clip, config, trigger_settings, captions=captions, dataset=VAL)
    attack_seconds = time.perf_counter() - start
    row = {"point": point, "attack": attack, "captions": captions, "lr": float(lr), "epochs": int(epochs),
           "poison_rate": float(rate), "pairs": pairs, "seed": seed, "device": device, "trigger_settings": trigger_settings,
           "attack_seconds": round(attack_seconds, 1),
           "none": score(pipeline.Defended(suspect, None), trigger, config.target, evaluation := [])}
    probe = pipeline.defend(suspect, "linear-probe", shots=shots, seed=seed, device=device,
                            data=DefenderData(VAL))
    row["linear-probe"] = score(probe, trigger, config.target)
    from clipguard.attacks import save_backdoored

    name = "".join(c if c.isalnum() or c in ".-" else "_" for c in point)
    save_backdoored(suspect, trigger, record, work / "models" / name)
    write_json(evaluation[0], work / "models" / name / "eval.json")  # as `clipguard attack` leaves it (on fmnist-val)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/regime")
    parser.add_argument("--point", action="append", required=True)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="builtin", help="the clean model to backdoor (a model spec)")
    parser.add_argument("--device", default="cpu", help="cpu (the tables' numbers), cuda, cuda:N")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "sweep.jsonl"
    done = {json.loads(line)["point"] for line in log.read_text().splitlines()} if log.exists() else set()
    if not (work / "clean.json").exists():
        clean = pipeline.evaluate(pipeline.load_model(args.model, device=args.device), dataset=VAL, progress=False)
        (work / "clean.json").write_text(json.dumps({"ca": round(100 * clean["clean_accuracy"]["value"], 2)}))
    print("clean model on", VAL, (work / "clean.json").read_text(), flush=True)
    for point in args.point:
        if point in done:
            continue
        row = run_point(point, work, args.shots, args.seed, args.model, args.device)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
