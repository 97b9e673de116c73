import pytest
import torch

from clipguard import ClipguardError
from clipguard.models.prompted import (
    DeepVisualPrompts, check_prompt_support, frozen_prefix, prompted_block, run_blocks, vision_head, vision_stem,
)


def test_unprompted_pass_reproduces_open_clip(tiny_clip, images16):
    visual = tiny_clip.model.visual
    pixels = tiny_clip.preprocess(images16)
    x, cls_states = run_blocks(visual, vision_stem(visual, pixels), 0)
    assert len(cls_states) == len(visual.transformer.resblocks)
    assert torch.allclose(vision_head(visual, x), visual(pixels), atol=1e-5)


def test_cached_prefix_gives_the_same_prompted_features_as_a_full_pass(tiny_clip, images16):
    visual = tiny_clip.model.visual
    pixels = tiny_clip.preprocess(images16)
    prompts = DeepVisualPrompts(3, start_block=1, length=5, width=32, generator=torch.Generator().manual_seed(0))
    prefix, frozen_states = frozen_prefix(visual, pixels, start=1)
    cached, _ = prompts(visual, prefix)
    x = visual.transformer.resblocks[0](vision_stem(visual, pixels))
    full, _ = run_blocks(visual, x, 1, prompts.prompts)
    assert torch.allclose(cached, vision_head(visual, full), atol=1e-6)
    # the frozen targets are the unprompted model's [CLS] states of the prompted blocks
    _, reference = run_blocks(visual, vision_stem(visual, pixels), 0)
    assert torch.allclose(frozen_states, torch.stack(reference[1:], dim=1), atol=1e-6)
    # prompts change the features, and gradients reach only the prompts
    assert not torch.allclose(cached, visual(pixels), atol=1e-3)
    cached.sum().backward()
    assert prompts.prompts.grad is not None and prompts.prompts.grad.abs().sum() > 0


def test_prompts_as_keys_only_equal_inserting_them(tiny_clip, images16, monkeypatch):
    """The fast prompted block (prompts as extra keys/values only) is the literal VPT-deep block:
    insert the prompts after [CLS], run the block, drop their outputs. Gradients agree too."""
    import clipguard.models.prompted as prompted

    def no_fallback(*args):
        raise AssertionError("open_clip's standard block must take the fast path")

    monkeypatch.setattr(prompted, "inserted_block", no_fallback)
    visual = tiny_clip.model.visual
    x = vision_stem(visual, tiny_clip.preprocess(images16))  # (B, 1 + N, width)
    prompt = torch.randn(5, x.shape[-1], generator=torch.Generator().manual_seed(0), requires_grad=True)
    for block in visual.transformer.resblocks:
        literal = block(torch.cat([x[:, :1], prompt.expand(len(x), -1, -1), x[:, 1:]], dim=1))
        literal = torch.cat([literal[:, :1], literal[:, 1 + len(prompt):]], dim=1)
        fast = prompted_block(block, x, prompt)
        assert fast.shape == x.shape and torch.allclose(fast, literal, atol=1e-5)
        (grad_literal,) = torch.autograd.grad(literal.square().sum(), prompt)
        (grad_fast,) = torch.autograd.grad(fast.square().sum(), prompt)
        assert torch.allclose(grad_fast, grad_literal, rtol=1e-4, atol=1e-5)
        x = fast.detach()


def test_the_last_block_on_cls_alone_is_exact(tiny_clip, images16):
    """cls_only runs the last block's queries and MLP on [CLS] alone: the features, every [CLS]
    state and the prompts' gradients are those of the full pass."""
    visual = tiny_clip.model.visual
    prefix, frozen_states = frozen_prefix(visual, tiny_clip.preprocess(images16), start=1)
    _, full_states = run_blocks(visual, prefix, 1)
    assert torch.allclose(frozen_states, torch.stack(full_states, dim=1), atol=1e-6)
    prompts = DeepVisualPrompts(3, start_block=1, length=5, width=32, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for cls_only in (False, True):
        prompts.cls_only = cls_only
        prompts.zero_grad()
        features, states = prompts(visual, prefix)
        (features.square().sum() + torch.stack(states, 1).sum()).backward()
        outputs[cls_only] = features, torch.stack(states, 1), prompts.prompts.grad.clone()
    for full, trimmed in zip(outputs[False], outputs[True]):
        assert torch.allclose(full, trimmed, rtol=1e-4, atol=1e-5)
    assert outputs[True][2][-1].abs().sum() > 0  # the last block's prompts still get gradients
    assert prompted_block(visual.transformer.resblocks[0], prefix, None, cls_only=True).shape == (len(prefix), 1, 32)


def test_non_vit_towers_are_refused():
    with pytest.raises(ClipguardError, match="VisionTransformer"):
        check_prompt_support(torch.nn.Linear(2, 2))
