import json
import os

import open_clip
import pytest
import torch

from clipguard import ClipguardError
from clipguard.models import load_clip, save_clip

from conftest import TINY


def _logits(clip, images):
    with torch.inference_mode():
        texts = clip.tokenize(["a photo of a bag.", "a dark coat on a black background."])
        return clip.encode_image(images, normalize=True) @ clip.encode_text(texts, normalize=True).T


def test_wrapper_takes_unit_range_images_and_normalises_inside(tiny_clip, images16):
    assert tiny_clip.image_size == 16
    features = tiny_clip.encode_image(images16)
    manual = tiny_clip.model.encode_image((images16 - tiny_clip.image_mean) / tiny_clip.image_std)
    assert torch.allclose(features, manual, atol=1e-6)
    # other sizes are resized to the model's, not rejected
    assert tiny_clip.encode_image(torch.rand(2, 3, 24, 24)).shape == (2, TINY.embed_dim)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_clip.encode_image(torch.rand(2, 16, 16))


def test_truncated_text_encoding_is_exact(tiny_clip):
    tokens = tiny_clip.tokenize(["a bag.", "a very small dark ankle boot on a black background."])
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # truncation actually happens
    fast = tiny_clip.encode_text(tokens)
    reference = tiny_clip.model.encode_text(tokens)
    assert torch.allclose(fast, reference, atol=1e-5)


def test_save_load_round_trip_gives_identical_logits(tiny_clip, images16, tmp_path):
    save_clip(tiny_clip, tmp_path / "m", extra={"attack": {"name": "none"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp leftovers
    loaded = load_clip(str(tmp_path / "m"))
    assert torch.equal(_logits(tiny_clip, images16), _logits(loaded, images16))
    assert loaded.config["attack"] == {"name": "none"}
    assert loaded.image_mean.flatten().tolist() == pytest.approx(tiny_clip.image_mean.flatten().tolist())


def test_saving_over_a_clipguard_output_replaces_it(tiny_clip, tmp_path):
    save_clip(tiny_clip, tmp_path / "m", extra={"run": 1})
    save_clip(tiny_clip, tmp_path / "m", extra={"run": 2})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging left beside it


def test_saving_over_a_directory_with_the_users_files_is_refused(tiny_clip, tmp_path):
    save_clip(tiny_clip, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ClipguardError, match="notes.txt"):
        save_clip(tiny_clip, tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoint_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"visual.proj": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ClipguardError, match="refused to load"):
        load_clip(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_openai_format_state_dict_is_loaded_with_inferred_architecture(tmp_path, images16):
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 64, "layers": 2},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    reference = open_clip.CLIP(**cfg).eval()
    torch.save(reference.state_dict(), tmp_path / "openai.pt")
    loaded = load_clip(str(tmp_path / "openai.pt"))
    x = (images16 - loaded.image_mean) / loaded.image_std
    assert torch.allclose(loaded.model.encode_image(x), reference.encode_image(x), atol=1e-5)


def test_open_clip_name_with_local_weights_file(tmp_path, images16):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "clipguard-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.manual_seed(1)
    reference = open_clip.create_model("clipguard-tiny-test").eval()
    from safetensors.torch import save_file

    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_clip(f"clipguard-tiny-test:{tmp_path / 'w.safetensors'}")
    x = (images16 - loaded.image_mean) / loaded.image_std
    assert torch.allclose(loaded.model.encode_image(x), reference.encode_image(x), atol=1e-6)
    # a state dict of another architecture is refused by name
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ClipguardError, match="does not match the architecture"):
        load_clip(f"clipguard-tiny-test:{tmp_path / 'other.pt'}")


@pytest.mark.parametrize("spec, message", [
    ("/no/such/dir/model", "cannot load model"),
    ("no-such-arch:openai", "unknown open_clip model"),
])
def test_bad_specs_give_one_line_errors(spec, message):
    with pytest.raises(ClipguardError, match=message) as err:
        load_clip(spec)
    assert "\n" not in str(err.value)


def test_damaged_model_directory_is_refused(tiny_clip, tmp_path):
    save_clip(tiny_clip, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ClipguardError, match="changed since clipguard wrote it"):
        load_clip(str(tmp_path / "m"))
    with pytest.raises(ClipguardError, match="cannot read"):  # unverified, it still cannot be read
        load_clip(str(tmp_path / "m"), verify=False)
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ClipguardError, match="not a clipguard model directory"):
        load_clip(str(tmp_path / "m"))


def test_pretrained_download_without_internet_says_how_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ClipguardError, match="ARCH:/path/to/weights.safetensors") as err:
        load_clip("ViT-B-32:openai")
    assert "\n" not in str(err.value)


def test_a_view_without_a_defense_sees_the_model_as_it_is(tiny_clip, images16):
    from clipguard.data.captions import PROMPT_TEMPLATES
    from clipguard.models.view import DefendedClip, NoDefense, vision_cls_states
    from clipguard.models.zeroshot import class_text_features

    view = DefendedClip(tiny_clip)
    assert isinstance(view.defense, NoDefense)
    assert torch.equal(view.encode_image(images16), tiny_clip.encode_image(images16, normalize=True))
    assert torch.equal(view.class_features(["coat", "bag"]),
                       class_text_features(tiny_clip, ["coat", "bag"], PROMPT_TEMPLATES))
    assert torch.equal(view.class_features(["coat"], "x", templates=["a {}"]),
                       class_text_features(tiny_clip, ["coat"], ["a {}"], "x"))
    assert torch.equal(view.cls_states(images16), vision_cls_states(tiny_clip, images16))
