import os
import subprocess
import sys

import pytest
import torch

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
