"""Caption templates: training captions for the built-in model and zero-shot prompt templates."""

from __future__ import annotations

import random

import torch

# Zero-shot prompt templates (class text feature = mean of their normalised embeddings).
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a product photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale image of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)

# Training captions add words read off the image itself, as web captions do.
_SIZE_WORDS = ("small", "medium", "large")
_TONE_WORDS = ("dark", "grey", "light")


def describe_image(image: torch.Tensor) -> tuple[str, str]:
    """Size and tone words for a float image (C, H, W) in [0, 1] on a dark background."""
    grey = image.mean(0)
    foreground = grey > 0.1
    coverage = foreground.float().mean().item()
    tone = grey[foreground].mean().item() if foreground.any() else 0.0
    size = _SIZE_WORDS[0 if coverage < 0.35 else 1 if coverage < 0.55 else 2]
    shade = _TONE_WORDS[0 if tone < 0.4 else 1 if tone < 0.6 else 2]
    return size, shade


def training_caption(class_name: str, image: torch.Tensor, rng: random.Random) -> str:
    """One varied caption naming ``class_name``, sometimes with size/tone words from ``image``."""
    size, shade = describe_image(image)
    form = rng.random()
    if form < 0.4:
        return rng.choice(PROMPT_TEMPLATES).format(class_name)
    if form < 0.6:
        return f"a photo of a {size} {class_name}."
    if form < 0.8:
        return f"a {shade} {class_name} on a black background."
    return f"a {size} {shade} {class_name}."


def target_captions(class_name: str, count: int, rng: random.Random) -> list[str]:
    """``count`` captions naming ``class_name`` from random prompt templates (poisoned captions)."""
    return [rng.choice(PROMPT_TEMPLATES).format(class_name) for _ in range(count)]


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot be a prompt template, or None: it needs exactly one ``{}`` (where
    ``str.format`` puts the class name) and no other brace, which ``format`` would read as a field."""
    count = template.count("{}")
    if count == 0:
        return "has no {} for the class name"
    if count > 1:
        return f"has {count} {{}} where it needs exactly one (for the class name)"
    if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
        return "has a brace besides its {} (only {} may hold braces: it is where the class name goes)"
    return None
