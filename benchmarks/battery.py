"""A hostile new user's battery: each case builds its fixture in a fresh temp dir, runs the
``clipguard`` CLI as a subprocess and classifies what happened into exactly one outcome:

    ok                refused with one ``clipguard: error:`` line and exit 2, or the right behaviour
    payload-ran       a pickle payload executed (its marker file exists)
    user-file-lost    a file the user had, outside what clipguard was asked to write, changed or vanished
    silent-wrong      exit 0 with a wrong result (CA differs from the reference decode, a polluted class
                      list, a missing warning or hint)
    unexpected-error  exit 1, a traceback, more than one stderr line, or a valid input refused
    leftover          a stale .tmp / .lock / staging directory / empty OUT.run left behind

The subprocesses import whatever ``clipguard`` the environment gives (``PYTHONPATH=/path/src`` to
test another checkout); the header line prints which. Cases run on 2 busy cores in about 10 min.

    python benchmarks/battery.py [--only SUBSTR] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import numpy as np
from PIL import Image

OUTCOMES = ("ok", "payload-ran", "user-file-lost", "silent-wrong", "unexpected-error", "leftover")
CASES: list[tuple[str, str, str, object]] = []  # (name, group, expected, function)
FIXTURES: Path = Path()  # shared, read-only fixtures (built once, copied into each case)
REFERENCE: dict[str, str] = {}  # the builtin model's CA on the fixture folder
SMALL_ATTACK = "pairs: 64\npoison_rate: 0.25\ntrain: {batch_size: 32, epochs: 1, warmup_steps: 0}\n"
RVPT = ["defend", "--method", "rvpt", "--shots", "1", "--set", "epochs=1", "--set", "prompt_length=2",
        "--device", "cpu", "--workers", "0"]
EVAL = ["evaluate", "--device", "cpu"]


def case(group: str, expected: str = "ok"):
    def register(function):
        CASES.append((function.__name__.replace("_", "-"), group, expected, function))
        return function
    return register


# ----------------------------------------------------------------------------------- running
class Result:
    def __init__(self, rc, out, err, secs):
        self.rc, self.out, self.err, self.secs = rc, out, err, secs
        self.lines = []
        for line in re.split(r"[\r\n]", err):
            at = line.find("clipguard: error:")
            line = (line[at:] if at > 0 else line).strip()  # a message may follow a progress bar's last frame
            if line and not re.search(r"\d+%\||it/s|s/it|\?it", line):  # tqdm bars are not messages
                self.lines.append(line)

    @property
    def refused(self) -> bool:
        """Exit 2 with one ``clipguard: error:`` line (warnings before it allowed) and no traceback."""
        errors = [line for line in self.lines if not line.startswith("WARNING")]
        return self.rc == 2 and len(errors) == 1 and errors[0].startswith("clipguard: error:")

    @property
    def crashed(self) -> bool:
        return self.rc not in (0, 2) or "Traceback" in self.err or (self.rc == 2 and not self.refused)

    def last(self, width: int = 150) -> str:
        """The last message line (else stdout's), cut to ``width`` characters."""
        text = self.lines[-1] if self.lines else (self.out.strip().splitlines() or [""])[-1]
        return text[:width]


def cli(args, cwd=None, timeout=300, env=None) -> Result:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "clipguard.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})
        result = Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)
        if VERBOSE:
            print(f"    $ clipguard {' '.join(map(str, args))[:200]}\n    -> exit {result.rc}: "
                  + "\n       ".join(result.lines[-6:]), flush=True)
        return result
    except subprocess.TimeoutExpired as err:
        return Result(124, str(err.stdout or ""), f"timeout after {timeout} s", time.perf_counter() - start)


def python(code: str, timeout=120) -> Result:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def snapshot(root: Path) -> dict[str, str]:
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state


def leftovers(root: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        name = path.name
        if (name.endswith(".tmp") or (name.startswith(".") and name.endswith(".lock")) or "clipguard-staging" in name
                or (name.endswith(".run") and path.is_dir() and not any(path.iterdir()))):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def refusal(r: Result, if_zero) -> tuple[str, str]:
    """The usual verdict: a crash is unexpected, a one-line refusal ok, exit 0 judged by ``if_zero``."""
    if r.crashed:
        return "unexpected-error", f"exit {r.rc}: {r.last()}"
    if r.rc == 2:
        return "ok", r.last()
    return if_zero(r)


def silent(what: str):
    return lambda r: ("silent-wrong", f"exit 0: {what}")


def accepted(r: Result) -> tuple[str, str]:
    return "ok", "exit 0: read"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def reference_ca(work: Path, data: Path) -> str:
    """The builtin model's CA on the fixture folder (8-bit PNGs), evaluated once per battery."""
    if "ca" not in REFERENCE:
        cli([*EVAL, "--dataset", data, "--workers", "0", "--json", work / "ref.json"])
        REFERENCE["ca"] = ca_of(read_json(work / "ref.json"))
    return REFERENCE["ca"]


def ca_of(record: dict) -> str:
    ca = record.get("clean_accuracy", {})
    return f"{ca.get('correct')}/{ca.get('total')}"


# ---------------------------------------------------------------------------------- fixtures
def build_fixtures(root: Path) -> None:
    """A 10-class ImageFolder of Fashion-MNIST test images (6 each), a tiny 28 px model directory."""
    import torch

    from clipguard.data import FMNIST_CLASSES, load_fmnist
    from clipguard.models import save_clip
    from clipguard.models.builtin import BuiltinArchitecture, build_builtin

    test = load_fmnist("test")
    for name in FMNIST_CLASSES:
        folder = root / "folder" / name.replace(" ", "_")
        folder.mkdir(parents=True)
        label = FMNIST_CLASSES.index(name)
        for i, index in enumerate(torch.nonzero(test.labels == label).flatten()[:6].tolist()):
            Image.fromarray(test.images[index, 0].numpy()).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    tiny = BuiltinArchitecture(image_size=28, patch_size=14, vision_width=32, vision_layers=3, vision_head_width=16,
                               text_width=32, text_heads=2, text_layers=1, context_length=16, embed_dim=16)
    save_clip(build_builtin(tiny).eval(), root / "tiny")


def folder(work: Path, name="data", per_class=6) -> Path:
    target = work / name
    shutil.copytree(FIXTURES / "folder", target)
    if per_class < 6:
        for path in target.rglob("*.png"):
            if int(path.stem) >= per_class:
                path.unlink()
    return target


def tiny(work: Path, name="model") -> Path:
    shutil.copytree(FIXTURES / "tiny", work / name)
    return work / name


def hf_dir(work: Path, name="hf", tokenizer=True) -> Path:
    """A tiny transformers CLIPModel directory (32 px) with CLIP's BPE as its own tokenizer files."""
    import gzip

    import open_clip.tokenizer as oct
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 4},
        projection_dim=16)
    path = work / name
    with redirect_stderr(io.StringIO()):  # its progress bar
        transformers.CLIPModel(config).eval().save_pretrained(str(path))
    if tokenizer:
        merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(oct.bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
    return path


def labelled_csv(work: Path, data: Path, name="labels.csv", sep=",", encoding="utf-8") -> Path:
    rows = [f"filepath{sep}label"] + [f"{p.relative_to(work)}{sep}{p.parent.name.replace('_', ' ')}"
                                      for p in sorted(data.rglob("*.png"))]
    (work / name).write_text("\n".join(rows) + "\n", encoding=encoding)
    return work / name


def shards(work: Path, count=128, caption=lambda i: f"a photo of item {i}", encoding="utf-8", keep_txt=lambda i: True):
    import webdataset as wds

    images = sorted((FIXTURES / "folder").rglob("*.png"))
    (work / "wds").mkdir()
    with wds.TarWriter(str(work / "wds" / "shard-000.tar")) as sink:
        for i in range(count):
            buffer = io.BytesIO()
            Image.open(images[i % len(images)]).convert("RGB").save(buffer, format="JPEG", quality=95)
            sample = {"__key__": f"s{i:06d}", "jpg": buffer.getvalue()}
            if keep_txt(i):
                sample["txt"] = caption(i).encode(encoding)
            sink.write(sample)
    return f"wds:{work}/wds/shard-{{000..000}}.tar"


def payload(path: Path, marker: Path) -> None:
    """A torch file whose unpickling creates ``marker``."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": Payload()}}, path)


@contextmanager
def tmpfs(path: Path, size: str, readonly=False):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def can_mount() -> bool:
    try:
        with tempfile.TemporaryDirectory() as d, tmpfs(Path(d) / "m", "1m"):
            return True
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError):
        return False


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
    if not MOUNT:
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
    if not MOUNT:
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
MOUNT = False
VERBOSE = False


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
    global FIXTURES, MOUNT, VERBOSE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name holds this")
    parser.add_argument("--json", help="write the table and counts here")
    parser.add_argument("--verbose", action="store_true", help="print each command and its last stderr lines")
    args = parser.parse_args(argv)
    VERBOSE = args.verbose
    where = python("import clipguard; print(clipguard.__file__)").out.strip()
    print(f"clipguard under test: {where}", flush=True)
    MOUNT = can_mount()
    chosen = [c for c in CASES if not args.only or args.only in c[0]]
    with tempfile.TemporaryDirectory(prefix="battery-fixtures-") as fixtures:
        FIXTURES = Path(fixtures)
        build_fixtures(FIXTURES)
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
