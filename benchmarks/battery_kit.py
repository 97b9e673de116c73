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

This module holds the runner and the fixtures; the cases are in battery_data.py (1-2) and
battery.py (3-4, and main).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from PIL import Image

OUTCOMES = ("ok", "payload-ran", "user-file-lost", "silent-wrong", "unexpected-error", "leftover")
CASES: list[tuple[str, str, str, object]] = []  # (name, group, expected, function)
FIXTURES: Path = Path()  # shared, read-only fixtures (built once, copied into each case); set by main
MOUNT = False  # whether a small tmpfs can be mounted (the full-disk cases); set by main
VERBOSE = False  # print each command and its last stderr lines; set by main
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


