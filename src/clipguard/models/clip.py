"""One wrapper over any open_clip CLIP: images in [0, 1], normalisation inside, fast text encoding."""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipModel(nn.Module):
    """A CLIP model as clipguard uses it.

    Wraps an open_clip ``CLIP`` (or ``CustomTextCLIP``) and owns its tokenizer and image
    normalisation, so every caller passes float images in [0, 1] of shape (B, 3, H, W).

    Args:
        model: the open_clip model (its weights are the model's only parameters).
        tokenizer: open_clip tokenizer, texts -> (B, context_length) int64.
        image_mean, image_std: per-channel normalisation applied inside ``encode_image``.
        config: what ``save_clip`` writes to ``config.json`` to rebuild the model
            (architecture, normalisation, source, and later the attack that made it).

    Example:
        >>> clip = load_clip("builtin")
        >>> clip.encode_image(torch.rand(4, 3, 28, 28)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        image_mean: Sequence[float] = OPENAI_MEAN,
        image_std: Sequence[float] = OPENAI_STD,
        config: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.config = dict(config or {})

    # ----------------------------------------------------------------- properties
    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature, exponentiated (a scalar tensor; ~100 for OpenAI CLIP)."""
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else -1

    def fingerprint(self) -> str:
        """A short hash of the weights: keys caches of things fitted against this exact model."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------- images
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, 3, S, S) at the model's image size."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = images.to(device=self.image_mean.device, dtype=self.image_mean.dtype)
        return (images - self.image_mean) / self.image_std

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, embed_dim) image features."""
        features = self.model.encode_image(self.preprocess(images))
        return F.normalize(features, dim=-1) if normalize else features

    # -------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """texts -> (B, context_length) int64 token ids (on CPU)."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, context_length) token ids -> (B, embed_dim) text features.

        For the standard CLIP text tower (causal mask, pooling at the end-of-text token, which
        has the highest id) the transformer runs only up to the longest sequence in the batch:
        with a causal mask the padding after a token cannot change it, so this is exact.
        """
        token_ids = token_ids.to(self.device)
        features = self._fast_encode_text(token_ids) if self._can_truncate_text() else None
        if features is None:
            features = self.model.encode_text(token_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Text features from token *embeddings* (B, L, width), e.g. with learned prompt vectors.

        ``token_ids`` (B, L) only locates the end-of-text token for pooling.
        """
        model = self.model
        length = embeddings.shape[1]
        x = embeddings + model.positional_embedding[:length].to(embeddings.dtype)
        mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        proj = model.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _can_truncate_text(self) -> bool:
        model = self.model
        return (
            hasattr(model, "token_embedding")
            and getattr(model, "text_pool_type", "argmax") == "argmax"
            and getattr(model, "attn_mask", None) is not None
        )

    def _fast_encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        length = int(token_ids.argmax(dim=-1).max()) + 1
        token_ids = token_ids[:, :length]
        cast_dtype = self.model.transformer.get_cast_dtype()
        return self.encode_text_embeddings(self.model.token_embedding(token_ids).to(cast_dtype), token_ids)

    # ---------------------------------------------------------------- zero-shot
    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image (B, D) and text (T, D) features, for contrastive training."""
        return self.encode_image(images, normalize=True), self.encode_text(token_ids, normalize=True)
