"""transformers CLIP checkpoints (CLIPModel.save_pretrained) load as exact open_clip models."""

import gzip
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from clipguard import ClipguardError  # noqa: E402
from clipguard.cli import main  # noqa: E402
from clipguard.models import load_clip, save_clip  # noqa: E402

from conftest import refused  # noqa: E402


def _tokenizer_files(directory):
    """CLIP's BPE (open_clip ships it) written as a transformers CLIPTokenizer: vocab.json + merges.txt."""
    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(str(directory))


def tiny_hf_clip(seed=0, act="quick_gelu"):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": act},
        vision_config={"hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 4, "hidden_act": act},
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms and scale, so a swapped tensor shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "logit_scale" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _features(hf_model, *args, image=True):
    out = hf_model.get_image_features(pixel_values=args[0]) if image else hf_model.get_text_features(input_ids=args[0])
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_hf_clip()
    model.save_pretrained(str(tmp_path / "hf"))
    _tokenizer_files(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_a_transformers_checkpoint_converts_exactly(tmp_path, act):
    model = tiny_hf_clip(act=act)
    model.save_pretrained(str(tmp_path / "hf"))
    clip = load_clip(str(tmp_path / "hf"))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = clip.tokenize(["a photo of a bag.", "a dog", "the quick brown fox jumps over the lazy dog"])
    with torch.no_grad():
        assert torch.allclose(clip.model.encode_image(pixels), _features(model, pixels), atol=1e-5)
        assert torch.allclose(clip.model.encode_text(ids), _features(model, ids, image=False), atol=1e-5)
        assert torch.allclose(clip.logit_scale, model.logit_scale.exp())
    assert clip.image_size == 32 and clip.config["source"] == str(tmp_path / "hf")


def test_the_tokenizer_comes_from_the_directory_and_saved_outputs_keep_it(tmp_path, hf_dir):
    model, path = hf_dir
    clip = load_clip(str(path))
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    assert isinstance(clip.tokenizer, HFTokenizer)
    texts = ["a photo of a bag.", "An Ankle-Boot!"]
    ids, reference = clip.tokenize(texts), SimpleTokenizer()(texts)
    for row, ref in zip(ids, reference):  # the same BPE: the same tokens up to the end of text
        end = int(ref.argmax())
        assert torch.equal(row[: end + 1], ref[: end + 1])
    save_clip(clip, tmp_path / "saved")
    assert (tmp_path / "saved" / "vocab.json").is_file()
    again = load_clip(str(tmp_path / "saved"))
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.encode_image(pixels), clip.encode_image(pixels), atol=1e-6)
        assert torch.equal(again.tokenize(texts), ids)


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    model = tiny_hf_clip(seed=3)
    model.save_pretrained(str(tmp_path / "bin"))
    (tmp_path / "bin" / "model.safetensors").unlink()  # as older transformers wrote it: a torch file
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    clip = load_clip(str(tmp_path / "bin"))
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clip.model.encode_image(pixels), _features(model, pixels), atol=1e-5)


def test_without_transformers_its_tokenizer_files_ask_for_the_extra(hf_dir, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ClipguardError, match=r"pip install 'clipguard\[hf\]'"):
        load_clip(str(hf_dir[1]))


def test_a_transformers_suspect_is_attacked_and_defended_into_ordinary_directories(tmp_path, hf_dir, capsys):
    _, path = hf_dir
    recipe = tmp_path / "a.yaml"
    recipe.write_text("pairs: 64\npoison_rate: 0.25\ntrain: {batch_size: 32, epochs: 1}\n")
    assert main(["attack", "--model", str(path), "--attack", "badnet", "--config", str(recipe), "--device", "cpu",
                 "--out", str(tmp_path / "bd")]) == 0
    saved = json.loads((tmp_path / "bd" / "config.json").read_text())
    assert saved["format"] == "clipguard.model" and saved["attack"]["steps"] == 2 and "vocab.json" in saved["files"]
    assert main(["defend", "--model", str(tmp_path / "bd"), "--method", "rvpt", "--shots", "1", "--set", "epochs=1",
                 "--device", "cpu", "--out", str(tmp_path / "rvpt")]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "bd"), "--defense", str(tmp_path / "rvpt"), "--limit", "50",
                 "--device", "cpu"]) == 0
    assert "ASR" in capsys.readouterr().out


def test_a_transformers_config_without_weights_is_refused(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    refused(capsys, ["evaluate", "--model", str(tmp_path / "hf")], "has a transformers config.json but no model.safetensors")
