"""The architecture of an OpenAI-format ViT CLIP state dict (OpenAI's ``model.pt`` tensors, or an
open_clip ``CLIP.state_dict()``), read from its tensor shapes.

Read from the shapes, and checked against every tensor that repeats them: vision width, layers,
patch and image size, MLP ratio; text width, layers, context length, vocabulary, MLP ratio; the
joint embedding size. Not in the shapes: the attention head count, the activation and the image
mean/std. They follow OpenAI's conventions (64-wide heads, QuickGELU, OpenAI's mean/std), which
hold for OpenAI's released ViT-B/32, B/16, L/14 and L/14@336 (matched by shape, silently); any
other shape gets a warning saying what was assumed and how to give the right values. A state
dict with exactly the built-in model's shapes takes the built-in's heads, activation and
Fashion-MNIST mean/std from its config.json, and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import torch
from safetensors import safe_open

from clipguard import ClipguardError
from clipguard.models.clip import OPENAI_MEAN, OPENAI_STD

logger = logging.getLogger(__name__)

OPENAI_ARCHITECTURES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")  # open_clip names of OpenAI's ViTs


def _blocks(state: dict, prefix: str, source) -> int:
    depth = prefix.count(".")  # the block index follows the prefix
    found = {k.split(".")[depth] for k in state if k.startswith(prefix)}
    if not found or found != {str(i) for i in range(len(found))}:
        raise ClipguardError(f"{source}: the blocks {prefix}N are not numbered 0..N-1 ({sorted(found)[:4]}); "
                             "not a complete CLIP state dict")
    return len(found)


def _heads(width: int) -> int:
    """OpenAI's head count for ``width`` (width / 64), lowered to a divisor of width when it is not one."""
    return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)


def infer_openai_model_cfg(state: dict, source="the state dict") -> dict:
    """open_clip model config of an OpenAI-format ViT CLIP state dict, under OpenAI's conventions for
    what the shapes do not give (64-wide heads, QuickGELU). Missing keys are a KeyError."""
    if "visual.proj" not in state:
        raise ClipguardError(f"{source} is not an OpenAI-format ViT CLIP state dict (ResNet towers are not inferred); "
                             "pass ARCH:FILE with the open_clip architecture name")
    conv = state["visual.conv1.weight"].shape  # (width, 3, patch, patch)
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise ClipguardError(f"{source}: visual.conv1.weight has shape {tuple(conv)}, not (width, 3, patch, patch)")
    width, patch = int(conv[0]), int(conv[2])
    positions = int(state["visual.positional_embedding"].shape[0])  # grid * grid + 1 ([CLS])
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ClipguardError(f"{source}: visual.positional_embedding has {positions} positions, not a square grid + 1")
    text_width = int(state["ln_final.weight"].shape[0])
    v_hidden = int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    t_hidden = int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "quick_gelu": True,
        "vision_cfg": {
            "layers": _blocks(state, "visual.transformer.resblocks.", source), "width": width,
            "head_width": width // _heads(width), "patch_size": patch, "image_size": patch * grid,
            "mlp_ratio": v_hidden / width,
        },
        "text_cfg": {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]), "width": text_width,
            "heads": _heads(text_width), "layers": _blocks(state, "transformer.resblocks.", source),
            "mlp_ratio": t_hidden / text_width,
        },
    }


def check_shapes(model: torch.nn.Module, state: dict, source) -> None:
    """Every tensor of ``state`` must have the shape the inferred ``model`` gives it."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ClipguardError(f"{source}: {key} has shape {tuple(tensor.shape)}, but the architecture its other "
                                 f"tensors give expects {tuple(expected[key].shape)}; not a consistent CLIP state dict")


def _shape_key(cfg: dict) -> tuple:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return (cfg["embed_dim"], v["width"], v["layers"], v["patch_size"], v["image_size"], v.get("mlp_ratio", 4.0),
            t["width"], t["layers"], t["context_length"], t["vocab_size"], t.get("mlp_ratio", 4.0))


def _builtin_record(state: dict, builtin_dir: Path) -> dict | None:
    """The built-in's config.json when ``state`` has exactly its tensor names and shapes, else None."""
    weights = builtin_dir / "model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("attn_mask")}
    return json.loads((builtin_dir / "config.json").read_text()) if ours == shapes else None


def openai_architecture(state: dict, source, builtin_dir: Path) -> tuple[dict, list, list]:
    """(model_cfg, image_mean, image_std) of an OpenAI-format state dict (see the module docstring)."""
    builtin = _builtin_record(state, builtin_dir)
    if builtin is not None:
        v, t = builtin["model_cfg"]["vision_cfg"], builtin["model_cfg"]["text_cfg"]
        logger.warning("%s has exactly the built-in model's tensor shapes: read with the built-in's heads (vision %d, "
                       "text %d), GELU and Fashion-MNIST mean/std; for another model of these shapes, load a clipguard "
                       "model directory whose config.json gives its own", source, v["width"] // v["head_width"],
                       t["heads"])
        return builtin["model_cfg"], builtin["image_mean"], builtin["image_std"]
    model_cfg = infer_openai_model_cfg(state, source)
    known = {_shape_key(open_clip.get_model_config(name)) for name in OPENAI_ARCHITECTURES}
    if _shape_key(model_cfg) not in known:
        v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        logger.warning("%s: architecture inferred from tensor shapes, but the shapes do not give the head count "
                       "(assumed width/64: vision %d, text %d), the activation (assumed QuickGELU) or the image "
                       "mean/std (assumed OpenAI's); if the model was trained otherwise its results are wrong. Give "
                       "them with ARCH:%s (an open_clip architecture name) or a clipguard model directory whose "
                       "config.json holds model_cfg, image_mean and image_std", source,
                       v["width"] // v["head_width"], t["heads"], source)
    return model_cfg, list(OPENAI_MEAN), list(OPENAI_STD)
