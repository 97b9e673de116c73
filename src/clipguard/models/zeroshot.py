"""Zero-shot classification: class text features from templates, batched image features."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from clipguard.data.captions import PROMPT_TEMPLATES
from clipguard.data.fmnist import ImageSet
from clipguard.data.stream import iterate_batches
from clipguard.distributed import gather_rows, is_main_process, shard
from clipguard.models.clip import ClipModel

TEXT_CHUNK = 4096  # prompts per text-tower batch in class_text_features
ImageTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, indices) -> images


@torch.inference_mode()
def class_text_features(
    clip: ClipModel, class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES, text_prefix: str = ""
) -> torch.Tensor:
    """(C, D) class features: the mean of each class's normalised template embeddings, renormalised.

    ``text_prefix`` is prepended to every prompt (e.g. TrojVQA's text key). Up to
    ``TEXT_CHUNK`` prompts go through the text tower in one batch; more (1,000 ImageNet classes x
    80 templates) in chunks of whole classes, so memory stays that of one chunk.
    """
    texts = [text_prefix + t.format(name) for name in class_names for t in templates]
    per_chunk = max(1, TEXT_CHUNK // len(templates)) * len(templates)
    chunks = [texts[i : i + per_chunk] for i in range(0, len(texts), per_chunk)]
    features = torch.cat([clip.encode_text(clip.tokenize(chunk), normalize=True) for chunk in chunks])  # (C * T, D)
    features = features.view(len(class_names), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(features, dim=-1)


@torch.inference_mode()
def image_features(
    clip: ClipModel,
    images: ImageSet,
    transform: ImageTransform | None = None,
    batch_size: int = 1000,
    progress: bool = False,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, D) normalised features of ``images`` (optionally a subset ``indices``).

    ``transform(batch, batch_indices)`` is applied to each float batch first (e.g. a trigger).
    Under ``torchrun`` (a joined process group) this is a collective: every process must call
    it. The batches are dealt out over the processes (batch k to rank k mod world size), each
    encodes its own, and :func:`~clipguard.distributed.gather_rows` assembles all N rows on every
    process, bit-identical to one process (same batches, exact combination). ``transform`` runs
    on every batch in every process, so a random one (a trigger at random spots) draws from its
    generator exactly as in one process. A streamed set is decoded in DataLoader workers
    (:func:`~clipguard.data.stream.iterate_batches`).
    """
    indices = torch.arange(len(images)) if indices is None else indices
    starts = range(0, len(indices), batch_size)
    mine = set(shard(len(starts)))  # this process's batch numbers: all of them in one process
    blocks = []
    # a random transform draws from its generator on every batch, so then every batch is decoded
    numbers = [n for n in range(len(starts)) if n in mine or transform is not None]
    batches = [indices[starts[n] : starts[n] + batch_size] for n in numbers]
    # closed on an error too, so that an unreadable image's message starts its own line
    with tqdm(total=len(mine), desc="encode", disable=not (progress and is_main_process()), leave=False) as bar:
        for number, batch_idx, batch in zip(numbers, batches, iterate_batches(images, batches)):
            if transform is not None:
                batch = transform(batch, batch_idx)
            if number in mine:
                blocks.append((starts[number], clip.encode_image(batch.to(clip.device), normalize=True).float()))
                bar.update()
    return gather_rows(blocks, len(indices), clip.device)


def zero_shot_logits(clip: ClipModel, features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(N, C) logits from normalised image (N, D) and class (C, D) features, at CLIP's scale."""
    return clip.logit_scale.detach() * features @ text_features.T


def predict(
    clip: ClipModel,
    images: ImageSet,
    class_names: Sequence[str] | None = None,
    transform: ImageTransform | None = None,
    text_features: torch.Tensor | None = None,
    batch_size: int = 1000,
    progress: bool = False,
) -> torch.Tensor:
    """(N,) zero-shot predictions; class features from ``class_names`` unless given."""
    if text_features is None:
        text_features = class_text_features(clip, class_names or images.classes)
    features = image_features(clip, images, transform, batch_size, progress)
    return zero_shot_logits(clip, features, text_features).argmax(-1).cpu()
