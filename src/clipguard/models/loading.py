"""Load a CLIP from a spec string and save it as a clipguard model directory.

Specs:
    builtin                     the shipped Fashion-MNIST CLIP (the default everywhere)
    builtin-broad               the shipped broad built-in CLIP (plain + web renderings; the light regime's)
    ViT-B-32:openai             an open_clip architecture + pretrained tag (downloads; needs internet)
    ViT-B-32:/path/weights.pt   an open_clip architecture + a local state-dict file
    hf-hub:org/repo             an open_clip model on the Hugging Face hub (needs internet)
    /path/to/dir                a clipguard model directory (config.json + model.safetensors), or a
                                transformers CLIPModel.save_pretrained directory (converted: models/hf.py)
    /path/to/file.pt|.safetensors  an OpenAI-format state dict; the architecture is inferred and checked
                                against the tensors, with a warning for what they do not give (models/openai_format.py)

State-dict files are read with ``safetensors`` or ``torch.load(weights_only=True)``: a suspect
checkpoint cannot run code while it loads. Pickled TorchScript archives are refused. A model
directory's config.json may name only plain file names of that directory (``files``,
``tokenizer_files``), and every weights or tokenizer file in it needs a recorded sha256 unless
``verify=False``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file, save_file

import clipguard
from clipguard import ClipguardError
from clipguard.device import resolve_device
from clipguard.models.clip import OPENAI_MEAN, OPENAI_STD, ClipModel
from clipguard.integrity import check_plain_name, file_digests, verify_files
from clipguard.outputs import staged_directory

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "weights" / "builtin-fmnist"
# the shipped models by spec name -> (directory, the recipe that rebuilds it)
BUILTIN_MODELS = {
    "builtin": (BUILTIN_DIR, "clipguard train-builtin"),
    "builtin-broad": (BUILTIN_DIR.parent / "builtin-broad", "clipguard train-builtin --config recipes/builtin-broad.yaml"),
}
MODEL_FORMAT = "clipguard.model"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def build_from_config(model_cfg: dict) -> torch.nn.Module:
    """An untrained open_clip model from a model config (embed_dim, vision_cfg, text_cfg, ...)."""
    cfg = dict(model_cfg)
    cfg.pop("custom_text", None)
    if "hf_model_name" in cfg.get("text_cfg", {}) or model_cfg.get("custom_text"):
        return open_clip.CustomTextCLIP(**cfg)
    return open_clip.CLIP(**cfg)


def _tokenizer_for(config: dict):
    name = config.get("tokenizer_name")
    if name:
        return open_clip.get_tokenizer(name)
    context = config["model_cfg"].get("text_cfg", {}).get("context_length", 77)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def _wrap(model, config: dict, tokenizer=None, tokenizer_files: dict[str, bytes] | None = None) -> ClipModel:
    model.eval()
    clip = ClipModel(
        model,
        tokenizer or _tokenizer_for(config),
        image_mean=config.get("image_mean", OPENAI_MEAN),
        image_std=config.get("image_std", OPENAI_STD),
        config=config,
    )
    clip.tokenizer_files = tokenizer_files or {}  # a transformers tokenizer's files, saved with the model
    return clip


def _own_tokenizer(path: Path, config: dict, files: dict[str, bytes]):
    """The tokenizer of a directory that carries its own tokenizer files, else None."""
    if not files:
        return None
    from clipguard.models.hf import hf_tokenizer

    config["tokenizer_files"] = sorted(files)
    return hf_tokenizer(path, config["model_cfg"].get("text_cfg", {}).get("context_length", 77))


def _load_transformers_dir(path: Path) -> ClipModel:
    """A transformers CLIP directory, converted (clipguard.models.hf)."""
    from clipguard.models import hf

    weights = hf.weights_file(path)
    model_cfg = hf.open_clip_config(json.loads((path / "config.json").read_text()), path)
    try:
        state = hf.convert_state_dict(read_state_dict(weights))
    except KeyError as missing:
        raise ClipguardError(f"{weights} is not a transformers CLIPModel checkpoint (no {missing}); "
                             "only the standard ViT CLIP converts") from None
    model = build_from_config(model_cfg)
    _load_state(model, state, weights)
    mean, std = hf.image_normalisation(path, OPENAI_MEAN, OPENAI_STD)
    config = {"format": MODEL_FORMAT, "source": str(path), "model_cfg": model_cfg, "image_mean": mean, "image_std": std}
    files = hf.read_tokenizer_files(path)
    return _wrap(model, config, _own_tokenizer(path, config, files), files)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ClipguardError(f"{path} is not valid JSON ({err}); the model directory is damaged") from None


def _load_model_dir(path: Path, verify: bool = True) -> ClipModel:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ClipguardError(f"{path} is not a clipguard model directory: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT or not isinstance(config.get("model_cfg"), dict):
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ClipguardError(f"{config_path} is not a clipguard model config (format {found!r})")
    from clipguard.models.hf import TOKENIZER_FILES, channel_stats

    names = config.get("tokenizer_files") or []
    if not isinstance(names, list):
        raise ClipguardError(f"{config_path}: tokenizer_files must be a list of file names; the directory is damaged")
    for name in names:
        check_plain_name(path, name, "tokenizer_files")
    verify_files(path, config, verify, also=[*names, *TOKENIZER_FILES] if names else ())
    for key, default in (("image_mean", OPENAI_MEAN), ("image_std", OPENAI_STD)):
        config[key] = channel_stats(config, key, default, config_path)
    try:
        model = build_from_config(config["model_cfg"])
    except Exception as err:  # open_clip's constructors raise TypeError/KeyError on a bad config
        raise ClipguardError(f"{config_path}: model_cfg does not describe an open_clip CLIP "
                             f"({type(err).__name__}: {err}); the model directory is damaged") from None
    _load_state(model, read_safetensors(weights_path), weights_path)
    files = {name: (path / name).read_bytes() for name in names}
    return _wrap(model, config, _own_tokenizer(path, config, files), files)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file; an empty, truncated or foreign file is a ClipguardError."""
    if path.stat().st_size == 0:
        raise ClipguardError(f"{path} is empty (0 bytes); re-save or re-download it")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ClipguardError(f"cannot read {path} as safetensors ({str(err).splitlines()[0][:120]}); "
                             "re-save or re-download it") from None


def check_finite(tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Refuse tensors holding NaN or inf: a diverged or damaged checkpoint would evaluate as garbage."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ClipguardError(f"{source} holds non-finite weights (NaN or inf in {name}): the run that made it "
                                 "diverged or the file is damaged; do not use it")


def _load_state(model: torch.nn.Module, state: dict, source: Path | str) -> None:
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    check_finite(state, source)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ClipguardError(f"{source} does not match the architecture ({first[:160]}); check the model name") from None
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ClipguardError(
            f"{source} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); check the model name"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file loaded with ``weights_only=True``."""
    if not path.is_file():
        raise ClipguardError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.stat().st_size == 0:
        raise ClipguardError(f"{path} is empty (0 bytes); re-save or re-download it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ClipguardError(
            f"refused to load {path}: not a plain tensor checkpoint ({type(err).__name__}); "
            "pickled code and TorchScript archives are not loaded - convert it to safetensors"
        ) from None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ClipguardError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _load_openai_file(path: Path) -> ClipModel:
    """An OpenAI-format state dict; its architecture is inferred and checked (models/openai_format.py)."""
    from clipguard.models.openai_format import check_shapes, openai_architecture

    state = read_state_dict(path)
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    try:
        model_cfg, mean, std = openai_architecture(state, path, BUILTIN_DIR)
    except KeyError as missing:
        raise ClipguardError(f"{path} is not an OpenAI-format CLIP state dict (no {missing}); "
                             "pass ARCH:FILE with the open_clip architecture name") from None
    model = build_from_config(model_cfg)
    check_shapes(model, state, path)
    _load_state(model, state, path)
    config = {"format": MODEL_FORMAT, "source": str(path), "model_cfg": model_cfg, "image_mean": mean, "image_std": std}
    return _wrap(model, config)


class _NotRandom(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" (clipguard loads them next)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _load_open_clip(name: str, pretrained: str | None) -> ClipModel:
    local = pretrained is not None and (os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"})
    if name not in open_clip.list_models() and not name.startswith("hf-hub:"):
        raise ClipguardError(f"unknown open_clip model {name!r}; see 'clipguard list' or open_clip.list_models()")
    try:
        if local:
            quiet, root = _NotRandom(), logging.getLogger()  # open_clip logs through the root logger
            root.addFilter(quiet)
            try:
                model = open_clip.create_model(name, pretrained=None)
            finally:
                root.removeFilter(quiet)
            _load_state(model, read_state_dict(Path(pretrained)), pretrained)
        else:
            model = open_clip.create_model(name, pretrained=pretrained)
        model_cfg = open_clip.get_model_config(name)
    except ClipguardError:
        raise
    except Exception as err:
        where = f"{name}:{pretrained}" if pretrained else name
        raise ClipguardError(
            f"could not load {where} ({type(err).__name__}: {str(err).splitlines()[0][:120]}); without internet, "
            f"download the weights elsewhere and pass ARCH:/path/to/weights.safetensors (or a clipguard model directory)"
        ) from None
    visual = model.visual
    config = {
        "format": MODEL_FORMAT,
        "source": f"{name}:{pretrained}" if pretrained else name,
        "model_cfg": model_cfg,
        "tokenizer_name": name,
        "image_mean": list(getattr(visual, "image_mean", None) or OPENAI_MEAN),
        "image_std": list(getattr(visual, "image_std", None) or OPENAI_STD),
    }
    return _wrap(model.float(), config)


def load_clip(spec: str = "builtin", device: str | torch.device = "cpu", verify: bool = True) -> ClipModel:
    """Load a CLIP from ``spec`` (see the module docstring) onto ``device``, in eval mode.

    A clipguard model directory's files are checked against the sha256 digests its config.json
    records; ``verify=False`` skips that (for files edited on purpose).

    >>> clip = load_clip("builtin")
    >>> clip.image_size, clip.tokenize(["a photo of a bag."]).shape
    (28, torch.Size([1, 32]))
    """
    device = resolve_device(device)
    path = Path(spec)
    if spec in BUILTIN_MODELS:
        directory, recipe = BUILTIN_MODELS[spec]
        if not (directory / WEIGHTS_NAME).is_file():
            raise ClipguardError(f"{spec} weights missing at {directory}; reinstall clipguard, or '{recipe}' "
                                 "makes them (then pass its OUT/model)")
        clip = _load_model_dir(directory, verify)
    elif spec.startswith("hf-hub:"):
        clip = _load_open_clip(spec, None)
    elif path.is_dir():
        from clipguard.models.hf import is_transformers_dir

        clip = _load_transformers_dir(path) if is_transformers_dir(path) else _load_model_dir(path, verify)
    elif path.is_file():
        clip = _load_openai_file(path)
    elif ":" in spec:
        name, pretrained = spec.split(":", 1)
        clip = _load_open_clip(name, pretrained)
    elif spec in open_clip.list_models():
        clip = _load_open_clip(spec, None)
        logger.warning("%s loaded with random weights: give a pretrained tag, e.g. %s:openai", spec, spec)
    else:
        raise ClipguardError(
            f"cannot load model {spec!r}: not 'builtin', 'builtin-broad', an existing file or directory, NAME:TAG, "
            "or hf-hub:ORG/REPO"
        )
    return clip.to(device)


def save_clip(
    clip: ClipModel,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``clip`` as a model directory (config.json + model.safetensors), atomically.

    ``extra`` entries (e.g. ``{"attack": {...}}``) are merged into config.json; ``tensor_files``
    maps more file names to tensors saved beside the weights (e.g. ``trigger.safetensors``).
    The directory is written under a temporary name and renamed, so an interrupted save
    leaves nothing behind; an existing ``directory`` is replaced only when it is a clipguard
    output. config.json records each weights file's sha256 under ``files``.
    """
    directory = Path(directory)
    config = {**clip.config, **(extra or {}), "format": MODEL_FORMAT, "clipguard_version": clipguard.__version__}
    config["image_mean"] = clip.image_mean.flatten().tolist()
    config["image_std"] = clip.image_std.flatten().tolist()
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in clip.model.state_dict().items()
        if not k.endswith("attn_mask")
    }
    check_finite(state, "the model to save")
    tokenizer_files = getattr(clip, "tokenizer_files", {})
    for name in [*(tensor_files or {}), *tokenizer_files]:  # never a path: the staging dir holds only plain names
        if not isinstance(name, str) or name in {"", ".", ".."} or Path(name).name != name or "\\" in name:
            raise ClipguardError(f"cannot save {directory}: {name!r} is not a plain file name")
    with staged_directory(directory) as staging:
        save_file(state, str(staging / WEIGHTS_NAME))
        for name, tensors in (tensor_files or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / name))
        for name, data in tokenizer_files.items():  # a transformers tokenizer travels with the model
            (staging / name).write_bytes(data)
        if tokenizer_files:
            config["tokenizer_files"] = sorted(tokenizer_files)
        config["files"] = file_digests(staging, [WEIGHTS_NAME, *(tensor_files or {}), *sorted(tokenizer_files)])
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    return directory
