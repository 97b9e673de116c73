"""CLIP models: load any open_clip CLIP, the built-in Fashion-MNIST model, save/load directories."""

from clipguard.models.clip import ClipModel
from clipguard.models.loading import load_clip, resolve_device, save_clip

__all__ = ["ClipModel", "load_clip", "resolve_device", "save_clip"]
