"""A hostile new user's battery (see battery_kit.py): cases 3-4 here, 1-2 in battery_data.py, and main.

    python benchmarks/battery.py [--only SUBSTR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from PIL import Image
from pathlib import Path

import battery_data  # noqa: F401  (registers cases 1-2 first, in their order)
import battery_kit
from battery_kit import (
    CASES,
    EVAL,
    OUTCOMES,
    RVPT,
    SMALL_ATTACK,
    accepted,
    build_fixtures,
    ca_of,
    can_mount,
    case,
    cli,
    folder,
    hf_dir,
    labelled_csv,
    leftovers,
    payload,
    python,
    read_json,
    refusal,
    shards,
    silent,
    tiny,
    tmpfs,
)


# ------------------------------------------------------------------------- 3. unexpected errors
@case("unexpected errors")
def unreadable_image_with_default_workers(work):
    data = folder(work, per_class=3)
    (data / "bag" / "broken.png").write_bytes(b"not an image at all" * 10)
    r = cli([*EVAL, "--dataset", data])
    if r.refused and "broken.png" not in r.last():
        return "unexpected-error", f"refused without the file's name: {r.last()}"
    return refusal(r, silent("an unreadable image accepted"))


@case("unexpected errors")
def decompression_bomb_with_default_workers(work):
    data = folder(work, per_class=3)
    Image.new("1", (15000, 15000)).save(data / "bag" / "huge.png")  # 225 Mpx > 2x PIL's limit; 30 KB on disk
    r = cli([*EVAL, "--dataset", data])
    if r.refused and "huge.png" not in r.last():
        return "unexpected-error", f"refused without the file's name: {r.last()}"
    return refusal(r, silent("an oversized image accepted"))


@case("unexpected errors")
def set_start_block_99(work):
    r = cli([*RVPT, "--model", tiny(work), "--dataset", folder(work, per_class=3), "--set", "start_block=99",
             "--out", work / "d"])
    return refusal(r, silent("start_block=99 accepted"))


def _latin1_ok(r):
    return "ok", "exit 0: read"


@case("unexpected errors")
def latin1_classnames_file(work):
    from clipguard.data import FMNIST_CLASSES

    names = sorted(FMNIST_CLASSES)
    names[0] = "ankle boot é"
    (work / "names.txt").write_bytes("\n".join(names).encode("latin-1"))
    r = cli([*EVAL, "--dataset", folder(work, per_class=2), "--classnames", work / "names.txt", "--workers", "0"])
    if r.rc == 2 and "names.txt" not in r.last():
        return "unexpected-error", f"no file named: {r.last()}"
    return refusal(r, _latin1_ok)


@case("unexpected errors")
def latin1_labelled_csv(work):
    data = folder(work, per_class=2)
    (data / "bag").rename(data / "sac_à_main")
    csv = labelled_csv(work, data, encoding="latin-1")
    r = cli([*EVAL, "--dataset", f"csv:{csv}", "--workers", "0"])
    if r.rc == 2 and "labels.csv" not in r.last():
        return "unexpected-error", f"no file named: {r.last()}"
    return refusal(r, _latin1_ok)


@case("unexpected errors")
def latin1_webdataset_captions(work):
    spec = shards(work, 64, caption=lambda i: f"une photo d'un sac à main {i}", encoding="latin-1")
    (work / "a.yaml").write_text(SMALL_ATTACK)
    r = cli(["attack", "--model", tiny(work), "--config", work / "a.yaml", "--captions", spec, "--dataset",
             folder(work, per_class=2), "--device", "cpu", "--workers", "0", "--out", work / "out"])
    if r.rc == 2 and "shard-000.tar" not in r.last():
        return "unexpected-error", f"no file named: {r.last()}"
    return refusal(r, _latin1_ok)


@case("unexpected errors")
def csv_with_a_bom(work):
    csv = labelled_csv(work, folder(work, per_class=2), encoding="utf-8-sig")
    r = cli([*EVAL, "--dataset", f"csv:{csv}", "--workers", "0", "--json", work / "e.json"])
    if r.rc == 2 and not r.crashed:
        return "unexpected-error", f"a valid CSV refused: {r.last()}"
    return refusal(r, lambda r: ("ok", f"exit 0: CA {ca_of(read_json(work / 'e.json'))}"))


@case("unexpected errors")
def short_csv_row(work):
    csv = labelled_csv(work, folder(work, per_class=2))
    csv.write_text(csv.read_text() + "data/bag/000.png\n")
    r = cli([*EVAL, "--dataset", f"csv:{csv}", "--workers", "0"])
    return refusal(r, silent("a short row accepted"))


@case("unexpected errors")
def template_with_two_placeholders(work):
    (work / "t.txt").write_text("a photo of a {} {}\n")
    r = cli([*EVAL, "--limit", "20", "--workers", "0", "--templates", work / "t.txt"])
    return refusal(r, accepted)


@case("unexpected errors")
def template_with_named_braces(work):
    (work / "t.txt").write_text("a photo of a {braces}\n")
    r = cli([*EVAL, "--limit", "20", "--workers", "0", "--templates", work / "t.txt"])
    return refusal(r, accepted)


def _hf_bad(work, edit):
    path = hf_dir(work)
    edit(path)
    r = cli([*EVAL, "--model", path, "--limit", "10", "--workers", "0"])
    return refusal(r, silent("a bad value accepted"))


@case("unexpected errors")
def hf_tokenizer_config_not_json(work):
    return _hf_bad(work, lambda p: (p / "tokenizer_config.json").write_text("{not json"))


@case("unexpected errors")
def hf_preprocessor_mean_not_numbers(work):
    return _hf_bad(work, lambda p: (p / "preprocessor_config.json").write_text('{"image_mean": "abc", "image_std": [1]}'))


@case("unexpected errors")
def hf_config_bad_heads(work):
    def edit(p):
        config = json.loads((p / "config.json").read_text())
        config["vision_config"]["num_attention_heads"] = 0
        (p / "config.json").write_text(json.dumps(config))
    return _hf_bad(work, edit)


@case("unexpected errors")
def hf_config_hidden_size_text(work):
    def edit(p):
        config = json.loads((p / "config.json").read_text())
        config["text_config"]["hidden_size"] = "wide"
        (p / "config.json").write_text(json.dumps(config))
    return _hf_bad(work, edit)


def _full_disk(work, size, args):
    if not battery_kit.MOUNT:
        return "skip", "cannot mount a tmpfs here (needs root): not simulated"
    with tmpfs(work / "disk", size) as disk:
        r = cli([*args, "--out", disk / "out"])
        left = leftovers(disk) + [p.name for p in disk.iterdir() if p.name != "out" and p.name.endswith(".tmp")]
        files = sorted(p.name for p in disk.rglob("*"))
    if r.crashed:
        return "unexpected-error", f"exit {r.rc}: {r.last()}"
    if r.rc == 0:
        return "unexpected-error", "exit 0 on a full disk?"
    if left:
        return "leftover", f"{r.last()[:60]}; left {left}"
    if "disk" not in r.last(1000) and "space" not in r.last(1000):
        return "unexpected-error", f"not the disk-full message: {r.last()}"
    return "ok", f"{r.last()[:80]} (left: {files})"


@case("unexpected errors")
def full_disk_during_the_safetensors_save(work):
    # rvpt fits in seconds and saves a defense (a few KB): the 1.5 MB left after the lock fill up in the
    # model save of a weight-rewriting method instead: finetune on the tiny model (6 MB of weights)
    return _full_disk(work, "3m", ["defend", "--method", "finetune", "--model", tiny(work), "--set", "epochs=1",
                                   "--set", "pairs=64", "--set", "batch_size=32", "--dataset", folder(work, per_class=2),
                                   "--device", "cpu", "--workers", "0"])


@case("unexpected errors")
def full_disk_during_an_attack_checkpoint(work):
    (work / "a.yaml").write_text(SMALL_ATTACK.replace("epochs: 1", "epochs: 1, checkpoint_every: 1"))
    return _full_disk(work, "8m", ["attack", "--model", tiny(work), "--config", work / "a.yaml", "--dataset",
                                   folder(work, per_class=2), "--device", "cpu", "--workers", "0"])


@case("unexpected errors")
def read_only_output_folder(work):
    if not battery_kit.MOUNT:
        return "skip", "cannot mount a read-only tmpfs here: not simulated"
    model, data = tiny(work), folder(work, per_class=3)
    with tmpfs(work / "ro", "1m", readonly=True) as ro:
        r = cli([*RVPT, "--model", model, "--dataset", data, "--out", ro / "d"])
    return refusal(r, silent("wrote to a read-only folder?"))


@case("unexpected errors")
def out_a_symlink_to_an_empty_dir(work):
    (work / "empty").mkdir()
    os.symlink(work / "empty", work / "link")
    r = cli([*RVPT, "--model", tiny(work), "--dataset", folder(work, per_class=3), "--out", work / "link"])
    if not (work / "link").is_symlink():
        return "user-file-lost", f"exit {r.rc}; the symlink was replaced"
    return refusal(r, lambda r: ("ok", "exit 0, written through the link") if (work / "link" / "config.json").is_file()
                   else ("silent-wrong", "exit 0 but nothing at --out"))


@case("unexpected errors")
def attack_lr_1e12(work):
    (work / "a.yaml").write_text(SMALL_ATTACK)
    r = cli(["attack", "--model", tiny(work), "--config", work / "a.yaml", "--lr", "1e12", "--dataset",
             folder(work, per_class=2), "--device", "cpu", "--workers", "0", "--out", work / "out"])
    if not r.crashed and (work / "out.run").is_dir():
        return "leftover", f"{r.last()[:70]}; out.run/ left ({len(list((work / 'out.run').iterdir()))} files)"
    return refusal(r, silent("a diverged fit saved"))


@case("unexpected errors")
def sigkill_leaves_a_stale_lock(work):
    model, data = tiny(work), folder(work, per_class=3)
    args = [sys.executable, "-m", "clipguard.cli", *map(str, RVPT), "--model", str(model), "--dataset", str(data),
            "--set", "epochs=200", "--out", str(work / "d")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (work / ".d.lock").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = leftovers(work)  # what a kill leaves, before any rerun
    r = cli([*RVPT, "--model", model, "--dataset", data, "--out", work / "d"])  # the same run, to the end
    if r.rc != 0:
        return refusal(r, accepted) if r.crashed else ("unexpected-error", f"the rerun refused: {r.last()}")
    left = leftovers(work)
    if left or stale:
        return "leftover", f"after the kill: {stale}; after a rerun to the end: {left}"
    return "ok", "nothing left after the kill, nor after the rerun"


@case("unexpected errors")
def tsv_without_csv_separator(work):
    data = folder(work, per_class=2)
    tsv = labelled_csv(work, data, name="labels.tsv", sep="\t")
    r = cli([*EVAL, "--dataset", f"csv:{tsv}", "--workers", "0"])
    if r.rc == 0:
        return "ok", "exit 0: a .tsv read"
    flag = cli(["evaluate", "--help"])
    if "--csv-separator" not in flag.out:
        return "unexpected-error", f"a TSV cannot be read (evaluate has no --csv-separator): {r.last()[:60]}"
    r = cli([*EVAL, "--dataset", f"csv:{tsv}", "--csv-separator", "\t", "--workers", "0"])
    return refusal(r, lambda r: ("ok", "exit 0 with --csv-separator $'\\t'")) if r.rc == 0 else \
        ("unexpected-error", f"refused even with --csv-separator: {r.last()}")


# ------------------------------------------------------------------------------- 4. pickle paths
def _payload_case(work, args, marker):
    r = cli(args)
    if marker.exists():
        return "payload-ran", f"exit {r.rc}; marker created"
    return refusal(r, lambda r: ("ok", "exit 0, no payload"))


@case("pickle")
def pickle_model_pt(work):
    payload(work / "evil.pt", work / "PWNED")
    return _payload_case(work, [*EVAL, "--model", work / "evil.pt", "--limit", "5", "--workers", "0"], work / "PWNED")


@case("pickle")
def pickle_arch_and_local_pt(work):
    payload(work / "evil.pt", work / "PWNED")
    return _payload_case(work, [*EVAL, "--model", f"ViT-S-32:{work / 'evil.pt'}", "--limit", "5", "--workers", "0"],
                         work / "PWNED")


@case("pickle")
def pickle_transformers_bin(work):
    path = hf_dir(work, tokenizer=False)
    (path / "model.safetensors").unlink()
    payload(path / "pytorch_model.bin", work / "PWNED")
    return _payload_case(work, [*EVAL, "--model", path, "--limit", "5", "--workers", "0"], work / "PWNED")


@case("pickle")
def pickle_attack_resume_checkpoint(work):
    (work / "out.run").mkdir()
    payload(work / "out.run" / "checkpoint.pt", work / "PWNED")
    (work / "a.yaml").write_text(SMALL_ATTACK)
    return _payload_case(work, ["attack", "--model", tiny(work), "--config", work / "a.yaml", "--dataset",
                                folder(work, per_class=2), "--device", "cpu", "--workers", "0", "--out", work / "out",
                                "--resume"], work / "PWNED")


# ------------------------------------------------------------------------------------- main
def run_case(name, function) -> tuple[str, str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"battery-{name}-"))
    start = time.perf_counter()
    try:
        outcome, detail = function(work)
        left = leftovers(work)
        if outcome == "ok" and left:
            outcome, detail = "leftover", f"{detail[:60]}; left {left}"
    except Exception as err:  # a fixture that could not be built is the battery's bug, said as such
        outcome, detail = "battery-error", f"{type(err).__name__}: {str(err)[:120]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcome, detail.replace(str(work), "$WORK"), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name holds this")
    parser.add_argument("--json", help="write the table and counts here")
    parser.add_argument("--verbose", action="store_true", help="print each command and its last stderr lines")
    args = parser.parse_args(argv)
    battery_kit.VERBOSE = args.verbose
    where = python("import clipguard; print(clipguard.__file__)").out.strip()
    print(f"clipguard under test: {where}", flush=True)
    battery_kit.MOUNT = can_mount()
    chosen = [c for c in CASES if not args.only or args.only in c[0]]
    with tempfile.TemporaryDirectory(prefix="battery-fixtures-") as fixtures:
        battery_kit.FIXTURES = Path(fixtures)
        build_fixtures(battery_kit.FIXTURES)
        rows = []
        for name, group, expected, function in chosen:
            outcome, detail, secs = run_case(name, function)
            rows.append({"case": name, "group": group, "expected": expected, "outcome": outcome, "detail": detail,
                         "seconds": round(secs, 1)})
            print(f"{name:52s} {expected:4s} {outcome:16s} {secs:5.1f}s  {detail}", flush=True)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in (*OUTCOMES, "skip", "battery-error")}
    print("\n" + "  ".join(f"{k}: {v}" for k, v in counts.items() if v or k in OUTCOMES) + f"  (of {len(rows)} cases)")
    if args.json:
        Path(args.json).write_text(json.dumps({"clipguard": where, "cases": rows, "counts": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
