"""Hugging Face ``transformers`` CLIP checkpoints (``CLIPModel.save_pretrained``) as open_clip models.

A directory with transformers' ``config.json`` (``model_type: clip``) and ``model.safetensors``
(or ``pytorch_model.bin``, read with ``weights_only=True``) converts exactly into the open_clip
``CLIP`` every other command uses. The mapping, per tower:

    vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}
        -> visual.{class_embedding, conv1, positional_embedding}
    vision_model.pre_layrnorm / post_layernorm      -> visual.ln_pre / visual.ln_post
    text_model.embeddings.{token,position}_embedding -> token_embedding / positional_embedding
    text_model.final_layer_norm                      -> ln_final
    *.encoder.layers.i.self_attn.{q,k,v}_proj        -> *.transformer.resblocks.i.attn.in_proj (stacked q, k, v)
    *.encoder.layers.i.{self_attn.out_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}
        -> *.resblocks.i.{attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj}
    visual_projection.weight / text_projection.weight (out, in) -> visual.proj / text_projection (in, out)
    logit_scale -> logit_scale

The tokenizer is the directory's own (its tokenizer files, through open_clip's ``HFTokenizer``)
when they are there, else CLIP's BPE. ``transformers`` is needed only to read the tokenizer
files: ``pip install 'clipguard[hf]'``.
Deviation: only the standard ViT CLIP converts (QuickGELU or GELU, LayerNorm eps 1e-5); other
variants are refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from clipguard import ClipguardError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def is_transformers_dir(path: Path) -> bool:
    """Whether ``path`` holds a transformers CLIP checkpoint (its config.json says ``model_type: clip``)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures")
    return config.get("model_type") == "clip" or (isinstance(architectures, list) and "CLIPModel" in architectures)


def _positive_int(tower: dict, key: str, default: int, where: str) -> int:
    value = tower.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClipguardError(f"{where}: {key} is {value!r}, not a positive integer; the config is damaged")
    return value


def open_clip_config(hf: dict, source: Path) -> dict:
    """The open_clip model config of a transformers CLIPConfig dict (from ``source``/config.json).

    Every value it uses is checked: a missing tower or a value of the wrong type is a
    ClipguardError naming the file and key."""
    where = source / "config.json"
    for key in ("vision_config", "text_config"):
        if not isinstance(hf.get(key), dict):
            raise ClipguardError(f"{where}: {key} is missing or not an object; not a transformers CLIPModel config")
    vision, text = hf["vision_config"], hf["text_config"]
    try:
        acts = {ACTIVATIONS[tower.get("hidden_act", "quick_gelu")] for tower in (vision, text)}
    except (KeyError, TypeError):
        raise ClipguardError(f"{source}: hidden_act {vision.get('hidden_act')!r} / {text.get('hidden_act')!r} is not "
                             "quick_gelu or gelu; only standard CLIP checkpoints convert") from None
    if len(acts) != 1:
        raise ClipguardError(f"{source}: the towers use different activations; only standard CLIP checkpoints convert")
    for tower in (vision, text):
        if tower.get("layer_norm_eps", 1e-5) != 1e-5:
            raise ClipguardError(f"{source}: layer_norm_eps {tower['layer_norm_eps']} (open_clip's CLIP uses 1e-5)")
    v, t = {}, {}
    for cfg, tower, name, defaults in (
        (v, vision, "vision_config", {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                                      "num_hidden_layers": 12, "image_size": 224, "patch_size": 32}),
        (t, text, "text_config", {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
                                  "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408}),
    ):
        for key, default in defaults.items():
            cfg[key] = _positive_int(tower, key, default, f"{where} {name}")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ClipguardError(f"{where} {name}: hidden_size {cfg['hidden_size']} is not a multiple of "
                                 f"num_attention_heads {cfg['num_attention_heads']}; the config is damaged")
    return {
        "embed_dim": _positive_int(hf, "projection_dim", 512, str(where)),
        "quick_gelu": acts.pop(),
        "vision_cfg": {
            "image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["hidden_size"],
            "layers": v["num_hidden_layers"], "head_width": v["hidden_size"] // v["num_attention_heads"],
            "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
        },
        "text_cfg": {
            "context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"], "width": t["hidden_size"],
            "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
            "mlp_ratio": t["intermediate_size"] / t["hidden_size"],
        },
    }


def convert_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel tensors -> open_clip CLIP tensors (see the module docstring)."""
    hf = {k.removeprefix("clip."): v for k, v in hf.items()}
    out = {"logit_scale": hf["logit_scale"].reshape(())}
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        layers = sorted({int(k.split(".")[3]) for k in hf if k.startswith(f"{tower}.encoder.layers.")})
        for i in layers:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{dst}{b}.{kind}"] = hf[f"{src}{a}.{kind}"]
    v, t = "vision_model.", "text_model."
    out.update({
        "visual.class_embedding": hf[f"{v}embeddings.class_embedding"],
        "visual.conv1.weight": hf[f"{v}embeddings.patch_embedding.weight"],
        "visual.positional_embedding": hf[f"{v}embeddings.position_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": hf[f"{t}embeddings.token_embedding.weight"],
        "positional_embedding": hf[f"{t}embeddings.position_embedding.weight"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
    })
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = hf[f"{v}pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = hf[f"{v}post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = hf[f"{t}final_layer_norm.{kind}"]
    return out


def read_tokenizer_files(path: Path) -> dict[str, bytes]:
    """The directory's tokenizer files (empty when it has none)."""
    return {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}


def hf_tokenizer(path: Path, context_length: int):
    """open_clip's HFTokenizer on the tokenizer files in ``path`` (needs transformers)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ClipguardError(f"{path} has its own tokenizer files, which need transformers: "
                             "pip install 'clipguard[hf]'") from None
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(str(path), context_length=context_length)
    except Exception as err:  # transformers/tokenizers raise many types on a damaged file
        found = [name for name in TOKENIZER_FILES if (path / name).is_file()]
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ClipguardError(f"cannot read the tokenizer files in {path} ({', '.join(found)}): {reason}; "
                             "re-save or re-download them") from None


def weights_file(path: Path) -> Path:
    """The directory's weights: model.safetensors, else pytorch_model.bin."""
    found = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if found is None:
        raise ClipguardError(f"{path} has a transformers config.json but no model.safetensors or pytorch_model.bin")
    return found


def image_normalisation(path: Path, mean: tuple, std: tuple) -> tuple[list, list]:
    """The image mean and std of the directory's preprocessor_config.json (else ``mean``, ``std``):
    three positive finite numbers each (one number is repeated), else a ClipguardError."""
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.is_file():
        return list(mean), list(std)
    try:
        pre = json.loads(preprocessor.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ClipguardError(f"cannot read {preprocessor} ({str(err)[:120]}); re-save or re-download it") from None
    if not isinstance(pre, dict):
        raise ClipguardError(f"{preprocessor} is not a JSON object; re-save or re-download it")
    return channel_stats(pre, "image_mean", mean, preprocessor), channel_stats(pre, "image_std", std, preprocessor)


def channel_stats(pre: dict, key: str, default: tuple, source: Path) -> list:
    """``pre[key]`` (else ``default``) as 3 finite floats (R, G, B); ``source`` is the file an error names."""
    value = pre.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    if not ok or (key == "image_std" and min(value) <= 0):
        raise ClipguardError(f"{source}: {key} is {value!r}; expected 3 finite numbers (R, G, B)"
                             f"{', each > 0' if key == 'image_std' else ''}")
    return [float(x) for x in value]
