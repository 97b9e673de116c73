import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from PIL import Image

from clipguard.cli import main
from clipguard.data import FMNIST_CLASSES, load_fmnist
from clipguard.defenses import save_defense
from clipguard.defenses.rvpt import RVPT, RVPTConfig
from clipguard.models import load_clip, save_clip
from clipguard.models.builtin import BuiltinArchitecture, build_builtin

TINY = BuiltinArchitecture(
    image_size=16, patch_size=8, vision_width=32, vision_layers=3, vision_head_width=16,
    text_width=32, text_heads=2, text_layers=2, context_length=16, embed_dim=16,
)

# Fashion-MNIST resolution: for tests that feed real data
TINY28 = BuiltinArchitecture(
    image_size=28, patch_size=14, vision_width=32, vision_layers=3, vision_head_width=16,
    text_width=32, text_heads=2, text_layers=1, context_length=16, embed_dim=16,
)


def make_tiny_clip(seed: int = 0, architecture: BuiltinArchitecture = TINY):
    torch.manual_seed(seed)
    return build_builtin(architecture).eval()


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture
def images16():
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_clip28():
    return make_tiny_clip(architecture=TINY28)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Learned triggers are cached per test, never in the user's cache."""
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))


def outputs_under_hash_seeds(script: str, seeds=("1", "2")) -> set[str]:
    """What ``script`` prints in fresh interpreters with different PYTHONHASHSEEDs (str hashes
    are salted per process; anything seeded from them differs between DDP processes)."""
    return {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in seeds
    }


# --------------------------------- shared by the CLI promise tests (bad inputs, outputs, user data)
def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its bytes (folders as entries too)."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 2 and one ``clipguard: error:`` line holding ``fragments``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("clipguard: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def model_dir(tmp_path):
    save_clip(make_tiny_clip(architecture=TINY28), tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def defense_dir(tmp_path, model_dir):
    clip = load_clip(str(model_dir))
    defense = RVPT(RVPTConfig(prompt_length=2, device="cpu"), clip, FMNIST_CLASSES)
    save_defense(defense, clip, tmp_path / "defense")
    return tmp_path / "defense"


DEFEND = ["defend", "--method", "rvpt", "--shots", "1", "--set", "epochs=1", "--set", "prompt_length=2",
          "--device", "cpu"]


def folder_of_test_images(root: Path, per_class: int, classes=None) -> Path:
    """An ImageFolder of the first ``per_class`` test images of each class (folder names with '_')."""
    test = load_fmnist("test")
    for name in classes or FMNIST_CLASSES:
        label = FMNIST_CLASSES.index(name)
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i, index in enumerate(torch.nonzero(test.labels == label).flatten()[:per_class].tolist()):
            Image.fromarray(test.images[index, 0].numpy()).save(folder / f"{i:03d}.png")
    return root


def caption_corpus(root: Path, count: int, size: int = 28) -> list[tuple[Image.Image, str]]:
    """``count`` Fashion-MNIST train images upscaled to ``size`` px RGB, each with a caption naming its class."""
    train = load_fmnist("train")
    pairs = []
    for i in range(count):
        name = FMNIST_CLASSES[int(train.labels[i])]
        image = Image.fromarray(train.images[i, 0].numpy()).convert("RGB").resize((size, size))
        pairs.append((image, f"a photo of a {name} on a table"))
    return pairs


def caption_csv(root: Path, count: int, separator: str = ",", img_key: str = "filepath",
                caption_key: str = "caption") -> Path:
    """An open_clip-style CSV of ``count`` pairs (images under ``root/images``)."""
    (root / "images").mkdir(parents=True)
    lines = [f"{img_key}{separator}{caption_key}"]
    for i, (image, caption) in enumerate(caption_corpus(root, count)):
        image.save(root / "images" / f"{i:05d}.png")
        lines.append(f"images/{i:05d}.png{separator}{caption}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def webdataset_shards(root: Path, count: int, shards: int = 2) -> str:
    """``count`` jpg + txt pairs written by webdataset's TarWriter into ``shards`` tars; returns
    the brace pattern (``root/shard-{000..001}.tar``)."""
    import io

    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    pairs = caption_corpus(root, count)
    per = -(-count // shards)
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as sink:
            for i in range(s * per, min(count, (s + 1) * per)):
                image, caption = pairs[i]
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=95)
                sink.write({"__key__": f"sample{i:06d}", "jpg": buffer.getvalue(), "txt": caption})
    return f"{root}/shard-{{000..{shards - 1:03d}}}.tar"
