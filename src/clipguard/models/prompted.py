"""Prompted forward passes through open_clip's VisionTransformer, via its public submodules.

VPT-deep (Jia et al., 2022) as RVPT uses it: ``b`` learnable tokens are inserted after [CLS]
in the input of every block from ``start_block`` on; each block gets fresh prompts and the
previous block's prompt outputs are dropped. Blocks before ``start_block`` see no prompts, so
their output for a fixed image is fixed: :func:`frozen_prefix` computes it once for reuse.

Because a block's prompt outputs are always dropped, a prompted block only needs the prompts
as extra keys and values: :func:`prompted_block` lets the image tokens attend to them and runs
the attention queries and the MLP on the image tokens alone, and projects the prompts' keys and
values once per batch. That is the same function as inserting the prompts into the sequence
(up to float rounding) at a fraction of the cost with 50 prompts and 17 image tokens
(``benchmarks/rvpt_cost.py`` measures it). The last block's outputs other than [CLS] feed
nothing (the head pools [CLS]), so it runs its queries and MLP on [CLS] alone (``cls_only``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clipguard import ClipguardError


def check_prompt_support(visual: nn.Module) -> None:
    """Refuse vision towers whose forward the prompted pass would not reproduce exactly."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    if any(not hasattr(visual, name) for name in needed):
        raise ClipguardError(f"{type(visual).__name__} is not an open_clip VisionTransformer; deep visual prompts need a ViT")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
            or getattr(visual, "final_ln_after_pool", False):
        raise ClipguardError("deep visual prompts support [CLS]-pooled ViTs (pool_type 'tok', no attention pooling)")


def vision_stem(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels (B, 3, H, W) -> token sequence (B, 1 + N, width) entering block 0."""
    x = visual.conv1(pixels)  # (B, width, grid, grid)
    x = x.flatten(2).transpose(1, 2)  # (B, N, width)
    cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)  # (B, 1, width)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    start: int,
    prompts: torch.Tensor | None = None,
    stop: int | None = None,
    cls_only: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run blocks ``start..stop-1`` (default: to the last); return the tokens (B, 1 + N, width)
    and each block's output [CLS] state (B, width).

    prompts: (L - start, b, width) or None. Block ``start + i`` gets ``prompts[i]`` after [CLS];
    no prompt output leaves a block (see :func:`prompted_block`).
    cls_only: the last block run computes only the [CLS] output; the tokens returned are then
    (B, 1, width). Exact for anything that reads [CLS] alone (the head, the states).
    """
    blocks = visual.transformer.resblocks[start:stop]
    cls_states = []
    for i, block in enumerate(blocks):
        last = cls_only and i == len(blocks) - 1
        if prompts is None and not last:
            x = block(x)
        else:
            x = prompted_block(block, x, None if prompts is None else prompts[i], cls_only=last)
        cls_states.append(x[:, 0])
    return x, cls_states


def prompted_block(block: nn.Module, x: torch.Tensor, prompt: torch.Tensor | None,
                   cls_only: bool = False) -> torch.Tensor:
    """One open_clip block over image tokens x (B, T, width) with ``prompt`` (b, width) inserted
    after [CLS] (None: no prompts); returns the image tokens' outputs (B, T, width), the prompts'
    being dropped, or with ``cls_only`` the [CLS] output alone (B, 1, width).

    The prompts enter only as keys and values: queries, the MLP and the residuals run on the T
    image tokens (on [CLS] alone with ``cls_only``; keys and values still come from every token).
    The prompts do not depend on the image, so their layer norm and key/value projections run
    once per call, not once per image. Blocks other than open_clip's standard
    ``ResidualAttentionBlock`` (or with attention dropout) take the literal path, :func:`inserted_block`.
    """
    prompt = None if prompt is None else prompt.to(x.dtype)
    attn = getattr(block, "attn", None)
    if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") or not attn.batch_first
            or not attn._qkv_same_embed_dim or attn.in_proj_bias is None or (attn.dropout and attn.training)):
        out = block(x) if prompt is None else inserted_block(block, x, prompt)
        return out[:, :1] if cls_only else out
    B, _, width = x.shape
    heads = attn.num_heads
    normed = block.ln_1(x)
    if cls_only:
        x = x[:, :1]
        q = F.linear(normed[:, :1], attn.in_proj_weight[:width], attn.in_proj_bias[:width])  # (B, 1, width)
        k, v = F.linear(normed, attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
    else:
        q, k, v = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (B, T, width) each
    if prompt is not None:
        pk, pv = F.linear(block.ln_1(prompt), attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
        # softmax attention does not depend on the order of the keys: prompts first, then the image tokens
        k = torch.cat([pk.expand(B, -1, -1), k], dim=1)  # (B, b + T, width)
        v = torch.cat([pv.expand(B, -1, -1), v], dim=1)

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, S, width) -> (B, heads, S, width / heads)
        return t.unflatten(-1, (heads, width // heads)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)  # (B, T or 1, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def inserted_block(block: nn.Module, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """VPT-deep as written, for any block: insert ``prompt`` (b, width) after [CLS] in x
    (B, T, width), run the block on all b + T tokens, drop the prompts' outputs."""
    out = block(torch.cat([x[:, :1], prompt.to(x.dtype).expand(len(x), -1, -1), x[:, 1:]], dim=1))
    return torch.cat([out[:, :1], out[:, 1 + len(prompt):]], dim=1)


def vision_head(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final tokens (B, 1 + N, width) -> image features (B, embed_dim), [CLS] pooled."""
    return visual.ln_post(x[:, 0]) @ visual.proj


@torch.no_grad()
def frozen_prefix(visual: nn.Module, pixels: torch.Tensor, start: int, batch_size: int = 256):
    """For fixed images: tokens entering block ``start`` (B, 1 + N, width) and the frozen
    model's [CLS] output states of blocks ``start..L-1`` (B, L - start, width).

    Both are constant while only prompts of blocks >= ``start`` train: compute once, reuse.
    """
    prefixes, states = [], []
    for chunk in pixels.split(batch_size):
        x, _ = run_blocks(visual, vision_stem(visual, chunk), 0, stop=start)
        prefixes.append(x)
        _, cls = run_blocks(visual, x, start, cls_only=True)
        states.append(torch.stack(cls, dim=1))
    return torch.cat(prefixes), torch.cat(states)


class DeepVisualPrompts(nn.Module):
    """The only trainable tensor of RVPT/VPT: (L - start_block, length, width) prompt tokens.

    Initialised Gaussian with std width^-0.5 (the scale of CLIP's own [CLS] embedding).
    """

    def __init__(self, num_blocks: int, start_block: int, length: int, width: int, generator: torch.Generator):
        super().__init__()
        if not 0 <= start_block < num_blocks:
            raise ValueError(f"start_block must be in [0, {num_blocks - 1}], got {start_block}")
        shape = (num_blocks - start_block, length, width)
        self.start_block = start_block
        self.prompts = nn.Parameter(torch.randn(shape, generator=generator) * width**-0.5)
        self.cls_only = True  # the last block on [CLS] alone (exact; False: all tokens, for benchmarks)

    def forward(self, visual: nn.Module, prefix: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prefix tokens entering ``start_block`` -> (image features (B, D), [CLS] states)."""
        x, cls_states = run_blocks(visual, prefix, self.start_block, self.prompts, cls_only=self.cls_only)
        return vision_head(visual, x), cls_states
