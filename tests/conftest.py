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
