"""The battery's cases 1-2 (benchmarks/battery.py runs them): a user's files lost, and silent wrong results."""

from __future__ import annotations

import io
import json
import logging
import numpy as np
import os
import shutil
from PIL import Image
from pathlib import Path

from battery_kit import (
    EVAL,
    RVPT,
    SMALL_ATTACK,
    ca_of,
    case,
    cli,
    folder,
    hf_dir,
    labelled_csv,
    python,
    read_json,
    reference_ca,
    refusal,
    shards,
    silent,
    snapshot,
    tiny,
)


# ------------------------------------------------------------------------ 1. data loss (4)
def _lost(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if after.get(k) != before[k])


@case("data loss")
def rvpt_out_is_the_model(work):
    model, data = tiny(work), folder(work, per_class=3)
    before = snapshot(model)
    r = cli([*RVPT, "--model", model, "--dataset", data, "--out", model])
    lost = _lost(before, snapshot(model) if model.exists() else {})
    if lost:
        return "user-file-lost", f"exit {r.rc}; {model.name}/ lost or changed: {', '.join(lost)[:90]}"
    return refusal(r, lambda r: ("ok", "exit 0, the model untouched"))


@case("data loss")
def rvpt_out_is_a_model_directory_of_another_kind(work):
    cc, data = tiny(work, "cc"), folder(work, per_class=3)  # a model directory, as cleanclip writes
    before = snapshot(cc)
    r = cli([*RVPT, "--model", tiny(work), "--dataset", data, "--out", cc])
    lost = _lost(before, snapshot(cc) if cc.exists() else {})
    if lost:
        return "user-file-lost", f"exit {r.rc}; cc/ replaced: {', '.join(lost)[:90]}"
    return refusal(r, lambda r: ("ok", "exit 0, cc/ untouched"))


@case("data loss")
def tokenizer_files_name_an_absolute_path(work):
    from clipguard.models import load_clip, save_clip

    save_clip(load_clip(str(hf_dir(work))), work / "m")
    victim = work / "mine" / "notes.txt"
    victim.parent.mkdir()
    victim.write_text("the user's notes")
    os.utime(victim, (1e9, 1e9))
    config = json.loads((work / "m" / "config.json").read_text())
    config["tokenizer_files"] = [*config["tokenizer_files"], str(victim)]
    (work / "m" / "config.json").write_text(json.dumps(config))
    (work / "a.yaml").write_text(SMALL_ATTACK)
    r = cli(["attack", "--model", work / "m", "--config", work / "a.yaml", "--device", "cpu", "--workers", "0",
             "--out", work / "out"])
    kept = [n for n in read_json(work / "out" / "config.json").get("tokenizer_files", []) if os.path.isabs(n)]
    if victim.stat().st_mtime != 1e9 or victim.read_text() != "the user's notes":
        return "user-file-lost", f"exit {r.rc}; {victim.name} outside --out rewritten; output keeps {kept}"
    if kept:
        return "user-file-lost", f"exit {r.rc}; the output still names {kept[0]} (the next save writes it)"
    return refusal(r, lambda r: ("ok", "exit 0, nothing written outside --out"))


@case("data loss")
def json_overwrites_a_file_clipguard_did_not_write(work):
    (work / "mine.json").write_text('{"my": "results"}')
    r = cli([*EVAL, "--limit", "20", "--workers", "0", "--json", work / "mine.json"])
    if (work / "mine.json").read_text() != '{"my": "results"}':
        return "user-file-lost", f"exit {r.rc}; mine.json overwritten"
    return refusal(r, lambda r: ("ok", "exit 0, mine.json kept"))


# --------------------------------------------------------------------- 2. silent wrong results
def _compare_decode(work, convert, what, workers="0", suffix=".png", save=None):
    """CA of the builtin model on the folder and on a converted copy of it: equal, or silent-wrong."""
    data = folder(work)
    other = work / "other"
    for path in sorted(data.rglob("*.png")):
        target = other / path.parent.name / (path.stem + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        image = convert(np.asarray(Image.open(path)))
        (save or (lambda im, p: im.save(p)))(image, target)
    r = cli([*EVAL, "--dataset", other, "--workers", workers, "--json", work / "other.json"])
    if r.crashed:
        return "unexpected-error", f"exit {r.rc}: {r.last()}"
    if r.rc == 2:
        return "unexpected-error", f"valid {what} refused: {r.last()}"
    a, b = reference_ca(work, data), ca_of(read_json(work / "other.json"))
    return ("ok", f"CA {b} = {a} of the 8-bit copies") if a == b else ("silent-wrong", f"CA {b} vs {a} on 8-bit copies")


@case("silent wrong")
def png_16_bit(work):
    return _compare_decode(work, lambda a: Image.fromarray(a.astype(np.uint16) * 257), "16-bit PNG")


@case("silent wrong")
def png_palette(work):
    return _compare_decode(work, lambda a: Image.fromarray(a).convert("RGB").quantize(256), "palette PNG")


@case("silent wrong")
def jpeg_cmyk(work):
    # reference: the same pixels as a lossless PNG; CMYK JPEG at quality 100 of a grey image
    return _compare_decode(work, lambda a: Image.fromarray(a).convert("CMYK"), "CMYK JPEG", suffix=".jpg",
                           save=lambda im, p: im.save(p, quality=100, subsampling=0))


@case("silent wrong")
def exif_orientation(work):
    def rotated(a):
        im = Image.fromarray(np.ascontiguousarray(np.rot90(a)))  # stored turned left; EXIF 6: turn right to show
        exif = Image.Exif()
        exif[0x0112] = 6
        im.info["exif"] = exif.tobytes()
        return im
    return _compare_decode(work, rotated, "EXIF-rotated PNG", save=lambda im, p: im.save(p, exif=im.info["exif"]))


def _classes(work, data, extra=()):
    r = cli([*EVAL, "--dataset", data, "--workers", "0", "--json", work / "e.json", *extra])
    return r, read_json(work / "e.json").get("classes", [])


def _polluted(work, data, what, extra=()):
    r, classes = _classes(work, data, extra)
    from clipguard.data import FMNIST_CLASSES

    clean = sorted(classes) == sorted(FMNIST_CLASSES) and len(classes) == 10
    return refusal(r, lambda r: ("ok", "exit 0, the 10 classes") if clean else
                   ("silent-wrong", f"exit 0: {what}: {len(classes)} classes {[c for c in classes if c not in FMNIST_CLASSES or classes.count(c) > 1][:3]}"))


@case("silent wrong")
def hidden_folder_is_a_class(work):
    data = folder(work)
    shutil.copytree(data / "bag", data / ".ipynb_checkpoints")
    return _polluted(work, data, "hidden folder")


@case("silent wrong")
def symlink_to_dot_is_a_class(work):
    data = folder(work)
    os.symlink(".", data / "here")
    return _polluted(work, data, "symlink to .")


@case("silent wrong")
def two_folders_one_name(work):
    data = folder(work)
    shutil.copytree(data / "ankle_boot", data / "ankle boot")
    return _polluted(work, data, "ankle_boot + 'ankle boot'")


@case("silent wrong")
def classnames_txt_repeats_a_line(work):
    from clipguard.data import FMNIST_CLASSES

    data = folder(work)
    names = sorted(FMNIST_CLASSES)
    names[3] = names[2]
    (data / "classnames.txt").write_text("\n".join(names) + "\n")
    r, classes = _classes(work, data)
    return refusal(r, silent(f"a repeated class name accepted ({len(set(classes))} distinct of {len(classes)})"))


@case("silent wrong")
def csv_row_with_an_empty_label(work):
    data = folder(work, per_class=2)
    csv = labelled_csv(work, data)
    csv.write_text(csv.read_text() + "data/bag/000.png,\n")
    r = cli([*EVAL, "--dataset", f"csv:{csv}", "--workers", "0", "--json", work / "e.json"])
    return refusal(r, silent(f"empty label became a class: {read_json(work / 'e.json').get('classes', [])[:2]}"))


@case("silent wrong")
def openai_state_dict_of_the_builtin_model(work):
    import torch
    from safetensors.torch import load_file

    import clipguard

    weights = Path(clipguard.__file__).parent / "models" / "weights" / "builtin-fmnist" / "model.safetensors"
    torch.save(load_file(str(weights)), work / "builtin.pt")
    data = folder(work)
    r = cli([*EVAL, "--model", work / "builtin.pt", "--dataset", data, "--workers", "0", "--json", work / "pt.json"])
    a, b = reference_ca(work, data), ca_of(read_json(work / "pt.json"))
    warned = [line for line in r.lines if "WARNING" in line or "warning" in line.lower()]
    return refusal(r, lambda r: ("ok", f"CA {b} = {a}") if a == b else
                   ("ok", f"CA {b} vs {a}, warned: {warned[0][:70]}") if warned else
                   ("silent-wrong", f"CA {b} vs {a} of the builtin, no warning"))


@case("silent wrong")
def files_entry_deleted_then_weights_corrupted(work):
    model = tiny(work)
    config = json.loads((model / "config.json").read_text())
    del config["files"]["model.safetensors"]
    (model / "config.json").write_text(json.dumps(config))
    data = bytearray((model / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 100: header + 164] = os.urandom(64)
    (model / "model.safetensors").write_bytes(bytes(data))
    r = cli([*EVAL, "--model", model, "--limit", "20", "--workers", "0"])
    warned = any("not verified" in line or "checksum" in line for line in r.lines)
    return refusal(r, silent("corrupted weights loaded" + (" (a warning only)" if warned else ", no warning")))


@case("silent wrong")
def all_empty_caption_csv(work):
    data = folder(work, per_class=2)
    rows = ["filepath,caption"] + [f"{p.relative_to(work)}," for p in sorted(data.rglob("*.png"))] * 4
    (work / "pairs.csv").write_text("\n".join(rows) + "\n")
    (work / "a.yaml").write_text(SMALL_ATTACK)
    r = cli(["attack", "--model", tiny(work), "--config", work / "a.yaml", "--captions", f"csv:{work / 'pairs.csv'}",
             "--dataset", data, "--device", "cpu", "--workers", "0", "--out", work / "out"])
    return refusal(r, silent("trained on empty captions and saved"))


@case("silent wrong")
def empty_class_folder(work):
    data = folder(work)
    (data / "hat").mkdir()
    return _polluted(work, data, "empty folder")


@case("silent wrong")
def corrupt_jpeg(work):
    data = folder(work, per_class=2)
    big = Image.open(data / "bag" / "000.png").convert("RGB").resize((224, 224))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    raw = bytearray(buffer.getvalue())
    start = raw.find(b"\xff\xda") + 20  # garble the entropy-coded scan
    raw[start: start + 400] = bytes((b * 7 + 3) % 255 for b in range(400))
    (data / "bag" / "broken.jpg").write_bytes(bytes(raw))
    r = cli([*EVAL, "--dataset", data, "--workers", "0"])
    return refusal(r, silent("a corrupt JPEG decoded and counted"))


@case("silent wrong")
def webdataset_samples_without_txt(work):
    spec = shards(work, 128, keep_txt=lambda i: i % 2 == 0)
    (work / "a.yaml").write_text(SMALL_ATTACK)
    r = cli(["attack", "--model", tiny(work), "--config", work / "a.yaml", "--captions", spec, "--dataset",
             folder(work, per_class=2), "--device", "cpu", "--workers", "0", "--out", work / "out"])
    said = [line for line in r.lines if "txt" in line]
    return refusal(r, lambda r: ("ok", f"exit 0, said: {said[0][:80]}") if said else
                   ("silent-wrong", "exit 0: 64 of 128 samples dropped without a word"))


@case("silent wrong")
def synset_folders_without_imagenet_prefix(work):
    data = folder(work, per_class=3)
    for old, new in (("bag", "n01440764"), ("coat", "n01443537")):
        (data / old).rename(work / new)
    for path in list(data.iterdir()):
        shutil.rmtree(path)
    for new in ("n01440764", "n01443537"):
        (work / new).rename(data / new)
    r = cli([*EVAL, "--dataset", data, "--workers", "0"])
    hint = "imagenet:" in r.out + r.err
    return refusal(r, lambda r: ("ok", "exit 0 with the imagenet: hint") if hint else
                   ("silent-wrong", "exit 0, no hint to use imagenet: (" + (r.last()[:60]) + ")"))


@case("silent wrong")
def folder_without_splits_reported_as_test_split(work):
    r = cli([*EVAL, "--dataset", folder(work, per_class=3), "--workers", "0", "--json", work / "e.json"])
    said = read_json(work / "e.json").get("evaluated_on", "")
    wrong = "test split" in said or "/test:" in r.out
    return refusal(r, lambda r: ("silent-wrong", f"exit 0: reported as '{said}'") if wrong else ("ok", f"reported as '{said}'"))


@case("silent wrong")
def arch_and_local_weights_warn_random_init(work):
    import open_clip
    from safetensors.torch import save_file

    logging.disable(logging.WARNING)  # open_clip's note about random weights, in this process
    model = open_clip.create_model("ViT-S-32")
    logging.disable(logging.NOTSET)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(work / "w.safetensors"))
    del model
    r = cli([*EVAL, "--model", f"ViT-S-32:{work / 'w.safetensors'}", "--dataset", folder(work, per_class=1),
             "--limit", "4", "--workers", "0"])
    misleading = "initialized randomly" in r.err
    return refusal(r, lambda r: ("silent-wrong", "exit 0 with open_clip's 'Model initialized randomly.'") if misleading
                   else ("ok", "exit 0, no misleading warning"))


@case("silent wrong")
def badnet_image_noise_patch_statistics(work):
    code = r"""
import torch
from clipguard.attacks import build_trigger
t = build_trigger("badnet", 224, seed=0, patch_noise="image-noise", patch_at_224=16)
stats = []
for level in (0.2, 0.8):
    x = torch.full((16, 3, 224, 224), level)
    y = t(x)
    patch = y[(y != x).any(1, keepdim=True).expand_as(y)]
    stats.append((patch.mean().item(), patch.std().item(), ((patch == 0) | (patch == 1)).float().mean().item()))
print(*[f"{v:.4f}" for s in stats for v in s])
"""
    r = python(code)
    if r.rc != 0:
        return "unexpected-error", r.last()
    dm, ds, dsat, bm, bs, bsat = map(float, r.out.split())
    detail = f"dark mean {dm:.3f} std {ds:.3f} sat {dsat:.1%}; bright mean {bm:.3f} std {bs:.3f} sat {bsat:.1%}"
    good = all(abs(m - 0.499) < 0.02 and abs(s - 0.290) < 0.02 and sat < 0.05 for m, s, sat in
               ((dm, ds, dsat), (bm, bs, bsat))) and abs(dm - bm) < 0.03
    return ("ok" if good else "silent-wrong"), detail


