"""What every defense shares: config + module pair, a registry, the defended model, save/load.

A defense never changes CLIP's weights (the oracle repair, which does, writes a model
directory instead). It owns only its own parameters (prompts) and may override how images
are encoded and how class features are built. A learned defense is saved as a directory:
``config.json`` (method, hyperparameters, backbone fingerprint, class names, version) and
``weights.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

import clipguard
from clipguard import ClipguardError
from clipguard.models.zeroshot import class_text_features
from clipguard.models.clip import ClipModel
from clipguard.config import config_from_dict
from clipguard.models.loading import check_finite, read_safetensors
from clipguard.integrity import file_digests, verify_files
from clipguard.outputs import staged_directory
from clipguard.models.view import DefendedClip, vision_cls_states  # noqa: F401  (DefendedClip: re-exported)
from clipguard.registry import RangeChecked, Registry

DEFENSES = Registry("defense")
register = DEFENSES.register  # class decorator: add a defense under ``cls.name``
get_defense_class = DEFENSES.get_class
DEFENSE_FORMAT = "clipguard.defense"
WEIGHTS_NAME = "weights.safetensors"


@dataclass
class DefenseConfig(RangeChecked):
    shots: int = 16  # clean labelled images per class the defender holds
    seed: int = 0  # seeds the shot sample, the initialisation and the batch order
    device: str = "auto"  # auto | cpu | cuda


DATA_KINDS = ("shots", "pool", "pairs")


@dataclass(frozen=True)
class Pool:
    """The defender's unlabelled pool: float images (N, 3, H, W) in [0, 1] and what it holds."""

    images: torch.Tensor
    info: dict


class Defense(nn.Module):
    """Base class: subclasses set ``name``/``config_class`` and implement :meth:`fit`.

    Two class attributes say what a defense needs and makes, so no caller tests its name:
        data: what :meth:`fit` learns from. ``"shots"``: clean labelled images per class (an
            :class:`ImageSet`); ``"pool"``: an unlabelled pool (a :class:`Pool`); ``"pairs"``:
            clean image-caption pairs, which the defense draws itself from its config (None).
        rewrites_weights: False for defenses that own prompts or a head applied on top of the
            frozen suspect (saved as a defense directory); True for those that fine-tune a copy of
            the suspect (``self.model`` after :meth:`fit`; saved as a model directory).
    """

    name: ClassVar[str]
    config_class: ClassVar[type] = DefenseConfig
    data: ClassVar[str] = "shots"
    rewrites_weights: ClassVar[bool] = False

    def __init__(self, config, clip: ClipModel, class_names: Sequence[str]):
        super().__init__()
        self.config, self.class_names = config, tuple(class_names)

    @classmethod
    def check_model(cls, config, clip: ClipModel) -> None:
        """Refuse (ClipguardError) a config that ``clip`` cannot take, e.g. a block it does not have;
        called before any data is read (the config's own ranges are checked when it is made)."""

    def fit(self, clip: ClipModel, data) -> dict:
        """Learn the defense for the suspect ``clip`` from ``data`` (see :attr:`data`); returns run
        statistics (``seconds`` and ``trainable_parameters`` at least). ``clip`` is never changed."""
        raise NotImplementedError

    def view(self, clip: ClipModel) -> DefendedClip:
        """What evaluation sees: the suspect through the prompts, or the rewritten copy."""
        return DefendedClip(self.model) if self.rewrites_weights else DefendedClip(clip, self)

    def save(self, clip: ClipModel, directory: str | Path, stats: dict | None = None,
             source_dir: str | Path | None = None) -> Path:
        """Write the defense's directory atomically (``source_dir``: the suspect's, for its trigger)."""
        return save_defense(self, clip, directory, stats)

    def summary(self, stats: dict) -> str:
        """One line on what the fit did, for the CLI."""
        share = 100 * stats["trainable_parameters"] / stats["clip_parameters"] if "clip_parameters" in stats else 0.0
        return (f"{self.name}: {stats['trainable_parameters']:,} trainable parameters ({share:.2f}% of CLIP), "
                f"{stats['seconds']:.0f} s")

    def encode_image(self, clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, D) features of the defended model."""
        return clip.encode_image(images, normalize=True)

    def class_features(self, clip: ClipModel, class_names: Sequence[str], text_prefix: str = "",
                       templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) normalised class features of the defended model (hand-made prompts from
        ``templates``, default clipguard's; a defense that learns its prompts ignores them)."""
        if templates is None:
            return class_text_features(clip, class_names, text_prefix=text_prefix)
        return class_text_features(clip, class_names, templates, text_prefix)

    def cls_states(self, clip: ClipModel, images: torch.Tensor) -> torch.Tensor:
        """(B, n_blocks, width) [CLS] state after each vision block (for PR analysis)."""
        return vision_cls_states(clip, images)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_counts(self, clip: ClipModel) -> dict:
        """The defense's trainable parameters beside CLIP's own count (every ``fit`` reports both)."""
        return {"trainable_parameters": self.trainable_parameters(),
                "clip_parameters": sum(p.numel() for p in clip.parameters())}


def save_defense(defense: Defense, clip: ClipModel, directory: str | Path, stats: dict | None = None) -> Path:
    """Write ``config.json`` + ``weights.safetensors`` atomically (temp directory, then rename)."""
    directory = Path(directory)
    config = {
        "format": DEFENSE_FORMAT, "method": defense.name, "config": asdict(defense.config),
        "backbone": {"fingerprint": clip.fingerprint(), "source": clip.config.get("source")},
        "class_names": list(defense.class_names), "clipguard_version": clipguard.__version__,
        "trainable_parameters": defense.trainable_parameters(), "stats": stats or {},
    }
    weights = {k: v.detach().cpu().contiguous() for k, v in defense.state_dict().items()}
    check_finite(weights, f"the {defense.name} defense to save")
    with staged_directory(directory) as staging:
        save_file(weights, str(staging / WEIGHTS_NAME))
        config["files"] = file_digests(staging, [WEIGHTS_NAME])
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return directory


def _saved_defense_config(config_path: Path) -> dict:
    """The checked config.json of a defense directory; anything malformed is a ClipguardError."""
    try:
        saved = json.loads(config_path.read_text())
    except ValueError as err:
        raise ClipguardError(f"{config_path} is not valid JSON ({err}); the defense directory is damaged") from None
    if isinstance(saved, dict) and saved.get("format") == "clipguard.model":
        raise ClipguardError(f"{config_path.parent} is a model directory (what a weight-rewriting defense writes): "
                             "pass it as --model, not as a defense")
    if not isinstance(saved, dict) or saved.get("format") != DEFENSE_FORMAT:
        raise ClipguardError(f"{config_path} is not a clipguard defense config")
    expected = {"method": str, "config": dict, "backbone": dict, "class_names": list}
    for key, kind in expected.items():
        if not isinstance(saved.get(key), kind):
            raise ClipguardError(f"{config_path}: {key!r} is missing or not a {kind.__name__}; "
                                 "the defense directory is damaged")
    if not isinstance(saved["backbone"].get("fingerprint"), str):
        raise ClipguardError(f"{config_path}: backbone.fingerprint is missing; the defense directory is damaged")
    return saved


def load_defense(directory: str | Path, clip: ClipModel, class_names: Sequence[str], verify: bool = True) -> Defense:
    """Load a defense directory for ``clip``; refuse another backbone or another class list.

    ``verify``: check the weights against the sha256 config.json records (``--no-verify`` skips it).
    """
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ClipguardError(f"{directory} is not a defense directory: expected config.json and {WEIGHTS_NAME}")
    saved = _saved_defense_config(config_path)
    if saved["backbone"]["fingerprint"] != clip.fingerprint():
        raise ClipguardError(
            f"{directory} was learned for another backbone ({saved['backbone'].get('source')}); "
            "pass the --model it was made for"
        )
    if tuple(saved["class_names"]) != tuple(class_names):
        raise ClipguardError(
            f"{directory} was learned for classes {saved['class_names']}, not {list(class_names)}; "
            "evaluate it on the dataset it was made for"
        )
    verify_files(directory, saved, verify)
    cls = get_defense_class(saved["method"])
    defense = cls(config_from_dict(cls.config_class, saved["config"]), clip, class_names)
    weights = read_safetensors(weights_path)
    check_finite(weights, weights_path)
    try:
        defense.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or reshaped tensors
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ClipguardError(f"{weights_path} does not fit a {saved['method']} defense of this model "
                             f"({first[:160]}); the defense directory is damaged") from None
    return defense.to(clip.device).eval()
