"""The built-in model: a small open_clip CLIP trained contrastively on Fashion-MNIST.

Architecture and recipe are dataclasses; ``clipguard train-builtin`` runs the recipe, and the
weights it made are shipped (fp16 safetensors) under ``models/weights/builtin-fmnist``.
``corpus="fmnist+web"`` (``recipes/builtin-broad.yaml``) trains a broader model on the plain
images plus their ``fmnist-web`` renderings; it is rebuilt from the recipe, not shipped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch

from clipguard.data.fmnist import FMNIST_CLASSES, load_fmnist
from clipguard.engine import FitResult, TrainConfig, fit
from clipguard.models.clip import ClipModel
from clipguard.models.contrastive import CaptionedImages, ContrastiveTask, caption_collate
from clipguard.models.loading import MODEL_FORMAT, build_from_config

logger = logging.getLogger(__name__)

# Fashion-MNIST train-set pixel statistics (grey, repeated over 3 channels).
FMNIST_MEAN, FMNIST_STD = (0.286,) * 3, (0.353,) * 3


@dataclass
class BuiltinArchitecture:
    image_size: int = 28  # Fashion-MNIST resolution
    patch_size: int = 7  # 4 x 4 = 16 patches + [CLS]
    vision_width: int = 192  # vision transformer width
    vision_layers: int = 6  # vision blocks (RVPT prompts the later ones)
    vision_head_width: int = 32  # 6 heads
    text_width: int = 128  # text transformer width (the 49,408-token embedding dominates size)
    text_heads: int = 4  # text attention heads
    text_layers: int = 4  # text blocks
    context_length: int = 32  # tokens per caption (captions here are < 20)
    embed_dim: int = 128  # joint embedding size

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")

    def model_cfg(self) -> dict:
        """The open_clip model config (what ``open_clip.CLIP(**cfg)`` takes)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                "layers": self.vision_layers, "head_width": self.vision_head_width,
            },
            "text_cfg": {
                "context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                "heads": self.text_heads, "layers": self.text_layers,
            },
        }


CORPORA = ("fmnist", "fmnist+web")  # BuiltinRecipe.corpus


@dataclass
class BuiltinRecipe:
    architecture: BuiltinArchitecture = field(default_factory=BuiltinArchitecture)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=256, lr=5e-4, weight_decay=0.1, warmup_steps=200)
    )
    train_images: int = 60000  # first N Fashion-MNIST train images (smaller for quick checks)
    # "fmnist": the plain images with drawn captions; "fmnist+web": those plus the fmnist-web renderings
    # (clipguard.data.web: colour, scale, place, background, a second item) of the same first
    # min(train_images, 55000) images, a broader corpus
    corpus: str = "fmnist"

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus {self.corpus!r}: expected one of {', '.join(CORPORA)}")


class _Concatenated(torch.utils.data.ConcatDataset):
    """Caption pairs of several corpora in one fit; ``set_epoch`` reaches each (fresh captions per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


def build_builtin(architecture: BuiltinArchitecture) -> ClipModel:
    """An untrained built-in CLIP (random weights, seeded by the caller)."""
    config = {
        "format": MODEL_FORMAT, "source": "builtin", "model_cfg": architecture.model_cfg(),
        "image_mean": list(FMNIST_MEAN), "image_std": list(FMNIST_STD), "classes": list(FMNIST_CLASSES),
        "architecture": asdict(architecture),
    }
    model = build_from_config(config["model_cfg"])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=architecture.context_length)
    return ClipModel(model, tokenizer, FMNIST_MEAN, FMNIST_STD, config)


def train_builtin(recipe: BuiltinRecipe, run_dir: str | Path | None = None, resume: bool = False) -> tuple[ClipModel, FitResult]:
    """Train the built-in CLIP from scratch with ``recipe``; deterministic under its seed."""
    torch.manual_seed(recipe.train.seed)
    clip = build_builtin(recipe.architecture)
    train = load_fmnist("train")
    if recipe.train_images < len(train):
        train = train.subset(torch.arange(recipe.train_images))
    dataset = CaptionedImages(train, recipe.train.seed)
    if recipe.corpus == "fmnist+web":
        from clipguard.data.web import CORPUS_IMAGES, WebCorpus

        web = WebCorpus(torch.arange(min(recipe.train_images, CORPUS_IMAGES)))  # renders only these positions
        dataset = _Concatenated([dataset, CaptionedImages(web, recipe.train.seed)])
    recipe_settings = {k: v for k, v in asdict(recipe).items() if k != "train"}
    result = fit(ContrastiveTask(clip), dataset, recipe.train, run_dir, resume, caption_collate(clip), "train-builtin",
                 settings={"recipe": recipe_settings})
    clip.config["train_recipe"] = asdict(recipe)
    return clip, result
