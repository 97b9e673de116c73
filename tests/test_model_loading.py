"""Loading a suspect model: its config.json names only its own files, every weights file is
checksummed, an OpenAI-format state dict is read with the right architecture or a warning, and
bad settings or values are one-line errors (issue 31)."""

import json
import logging
import re

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipguard import ClipguardError
from clipguard.data import FMNIST_CLASSES
from clipguard.defenses import load_defense
from clipguard.models import load_clip, save_clip

from conftest import DEFEND, make_tiny_clip, refused, snapshot


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------- a model directory names only its own files
@pytest.mark.parametrize("key", ["tokenizer_files", "files"])
@pytest.mark.parametrize("entry", ["ABS", "../outside.txt", "sub/vocab.json", "LINK"])
def test_a_config_naming_files_outside_its_directory_is_refused(tmp_path, model_dir, key, entry):
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's file")
    if entry == "ABS":
        entry = str(outside)
    elif entry == "LINK":  # a symlink inside the directory that leads out of it
        (model_dir / "vocab.json").symlink_to(outside)
        entry = "vocab.json"
    before = snapshot(tmp_path)

    def add(config):
        if key == "files":
            config["files"][entry] = "0" * 64
        else:
            config["tokenizer_files"] = [entry]
    _edit_config(model_dir, add)
    for verify in (True, False):
        with pytest.raises(ClipguardError, match=rf"{key}'? names '{re.escape(entry)}'") as err:
            load_clip(str(model_dir), verify=verify)
        assert "\n" not in str(err.value)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "model/config.json"} == \
        {k: v for k, v in before.items() if k != "model/config.json"}


def test_the_cli_refuses_a_tokenizer_path_in_one_line(tmp_path, model_dir, capsys):
    _edit_config(model_dir, lambda c: c.update(tokenizer_files=["/etc/hostname"]))
    refused(capsys, ["evaluate", "--model", str(model_dir), "--limit", "10"], "tokenizer_files", "/etc/hostname")


def test_save_writes_only_plain_names(tmp_path):
    clip = make_tiny_clip()
    clip.tokenizer_files = {"../escaped.json": b"{}"}
    with pytest.raises(ClipguardError, match="not a plain file name"):
        save_clip(clip, tmp_path / "out" / "m")
    assert not (tmp_path / "out" / "escaped.json").exists() and not (tmp_path / "out" / "m").exists()


# ------------------------------------------------------- every weights file has a checksum
def test_deleting_a_weights_checksum_does_not_switch_verification_off(tmp_path, model_dir):
    _edit_config(model_dir, lambda c: c["files"].pop("model.safetensors"))
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-1] ^= 1  # corrupted weights: would load silently if the missing entry meant "not checked"
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ClipguardError, match="records no checksum for model.safetensors.*--no-verify"):
        load_clip(str(model_dir))
    load_clip(str(model_dir), verify=False)  # a deliberate edit still loads


def test_a_directory_with_no_checksums_at_all_is_refused_unless_no_verify(model_dir, capsys):
    _edit_config(model_dir, lambda c: c.pop("files"))
    refused(capsys, ["evaluate", "--model", str(model_dir), "--limit", "10"], "records no checksums", "--no-verify")
    assert load_clip(str(model_dir), verify=False).image_size == 28


def test_an_unrecorded_trigger_or_defense_weights_file_is_refused(tmp_path, model_dir, defense_dir):
    clip = load_clip(str(model_dir))
    save_clip(clip, tmp_path / "bd", tensor_files={"trigger.safetensors": {"patch": torch.zeros(3, 2, 2)}})
    _edit_config(tmp_path / "bd", lambda c: c["files"].pop("trigger.safetensors"))
    with pytest.raises(ClipguardError, match="no checksum for trigger.safetensors"):
        load_clip(str(tmp_path / "bd"))
    _edit_config(defense_dir, lambda c: c.pop("files"))
    with pytest.raises(ClipguardError, match="records no checksums.*--no-verify"):
        load_defense(defense_dir, clip, FMNIST_CLASSES)
    load_defense(defense_dir, clip, FMNIST_CLASSES, verify=False)


# ------------------------------------------------------- OpenAI-format state dicts
def _logits(clip, images):
    with torch.inference_mode():
        texts = clip.tokenize(["a photo of a bag.", "a photo of a coat."])
        return clip.encode_image(images, normalize=True) @ clip.encode_text(texts, normalize=True).T


def test_the_builtin_as_an_openai_state_dict_loads_with_its_own_heads_and_normalisation(tmp_path, caplog):
    builtin = load_clip("builtin")
    torch.save(builtin.model.state_dict(), tmp_path / "builtin.pt")
    with caplog.at_level(logging.WARNING):
        loaded = load_clip(str(tmp_path / "builtin.pt"))
    assert loaded.model.visual.transformer.resblocks[0].attn.num_heads == 6  # width 192 / 64 would say 3
    assert loaded.model.transformer.resblocks[0].attn.num_heads == 4
    assert loaded.image_mean.flatten().tolist() == pytest.approx(builtin.image_mean.flatten().tolist())
    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(loaded, images), _logits(builtin, images), atol=1e-5)
    assert "exactly the built-in model's tensor shapes" in caplog.text


TINY_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_an_ambiguous_state_dict_warns_what_was_assumed(tmp_path, caplog):
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_CFG).state_dict(), tmp_path / "tiny.pt")
    with caplog.at_level(logging.WARNING):
        load_clip(str(tmp_path / "tiny.pt"))
    assert "head count (assumed width/64" in caplog.text and f"ARCH:{tmp_path / 'tiny.pt'}" in caplog.text


def test_openai_shapes_load_silently(tmp_path, caplog, monkeypatch):
    from clipguard.models import openai_format

    cfg = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 64, "head_width": 64},
           "text_cfg": {**TINY_CFG["text_cfg"], "width": 64, "heads": 1}}
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: cfg)  # stands for OpenAI's ViT-B-32
    torch.save(open_clip.CLIP(**cfg, quick_gelu=True).state_dict(), tmp_path / "vit.pt")
    with caplog.at_level(logging.WARNING):
        load_clip(str(tmp_path / "vit.pt"))
    assert openai_format.__name__ not in caplog.text


def test_a_state_dict_whose_tensors_disagree_is_refused_by_name(tmp_path):
    state = open_clip.CLIP(**TINY_CFG).state_dict()
    state["visual.proj"] = torch.zeros(33, 16)  # width 32 elsewhere
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ClipguardError, match=r"visual.proj has shape \(33, 16\).*expects \(32, 16\)"):
        load_clip(str(tmp_path / "bad.pt"))


def test_local_weights_for_an_open_clip_architecture_do_not_claim_random_init(tmp_path, caplog):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "clipguard-tiny-loading.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / "cfgs")
    reference = open_clip.create_model("clipguard-tiny-loading")
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("clipguard-tiny-loading")
    assert "initialized randomly" in caplog.text  # what open_clip says on its own
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_clip(f"clipguard-tiny-loading:{tmp_path / 'w.safetensors'}")
    assert "initialized randomly" not in caplog.text
    assert not logging.getLogger().filters  # the filter is removed again


# ------------------------------------------------------- defense settings the model cannot take
def test_start_block_beyond_the_models_blocks_is_refused_before_any_data(tmp_path, model_dir, capsys, monkeypatch):
    from clipguard import pipeline

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the config was checked")

    monkeypatch.setattr(pipeline, "defense_data", no_data)
    refused(capsys, [*DEFEND, "--model", str(model_dir), "--set", "start_block=99", "--out", str(tmp_path / "d")],
            "start_block=99", "3 vision blocks", "0 to 2")
    assert not (tmp_path / "d").exists()


def test_a_saved_defense_with_an_impossible_start_block_is_refused(defense_dir, model_dir):
    _edit_config(defense_dir, lambda c: c["config"].update(start_block=99))
    with pytest.raises(ClipguardError, match="start_block=99"):
        load_defense(defense_dir, load_clip(str(model_dir)), FMNIST_CLASSES)


# ------------------------------------------------------- bad transformers values
@pytest.fixture
def hf_model_dir(tmp_path):
    pytest.importorskip("transformers")
    from test_hf import tiny_hf_clip

    tiny_hf_clip().save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.mark.parametrize("edit, fragments", [
    (lambda c: c.pop("vision_config"), ("config.json", "vision_config")),
    (lambda c: c["vision_config"].update(hidden_size="32"), ("config.json vision_config", "hidden_size is '32'")),
    (lambda c: c["text_config"].update(num_attention_heads=3), ("text_config", "not a multiple of num_attention_heads 3")),
    (lambda c: c.update(projection_dim=1.5), ("config.json", "projection_dim is 1.5")),
])
def test_bad_transformers_config_values_are_named(hf_model_dir, capsys, edit, fragments):
    _edit_config(hf_model_dir, edit)
    refused(capsys, ["evaluate", "--model", str(hf_model_dir), "--limit", "10"], *fragments)


@pytest.mark.parametrize("pre, fragment", [
    ({"image_mean": "0.5", "image_std": [0.5, 0.5, 0.5]}, "image_mean is '0.5'"),
    ({"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, "image_mean is [0.5, 0.5]"),
    ({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.0, 0.5]}, "image_std is [0.5, 0.0, 0.5]"),
    ("{not json", "cannot read"),
])
def test_bad_preprocessor_values_are_named(hf_model_dir, pre, fragment):
    text = pre if isinstance(pre, str) else json.dumps(pre)
    (hf_model_dir / "preprocessor_config.json").write_text(text)
    with pytest.raises(ClipguardError, match=re.escape(fragment)) as err:
        load_clip(str(hf_model_dir))
    assert "preprocessor_config.json" in str(err.value) and "\n" not in str(err.value)


def test_an_unreadable_tokenizer_file_is_named(hf_model_dir, capsys):
    (hf_model_dir / "tokenizer.json").write_text("{not json")
    refused(capsys, ["evaluate", "--model", str(hf_model_dir), "--limit", "10"], "cannot read the tokenizer files",
            "tokenizer.json")
