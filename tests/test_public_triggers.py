"""The public CleanCLIP code's triggers and pipeline steps (issue 31: "Triggers that are not the
public code's"): its BadNet patch as its uint8 conversion makes it, its WaNet grid file, its JPEG
poisoned images and its squashed triggered test images. The references are written here from
the formulas of that code's ``backdoor/utils.py`` (``apply_trigger``)."""

import io
import platform
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, build_poisoned_pairs, build_trigger, load_trigger
from clipguard.attacks.base import jpeg_round_trip, public_uint8
from clipguard.data import load_fmnist
from clipguard.data.images import decode_image
from clipguard.outputs import TRIGGER_FILE


def wrapped(values: torch.Tensor) -> list[int]:
    """Reference for C's float -> uint8 cast as x86 does it: truncate toward zero, then modulo 256."""
    return [int(v) % 256 for v in values.flatten().tolist()]


def test_public_uint8_wraps_like_torch_byte():
    values = torch.tensor([-0.3, 1.7, 2.2, -1.0, -0.001, 1.0, 0.5])
    assert public_uint8(values).tolist() == [180, 177, 49, 1, 0, 255, 127]
    many = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    assert public_uint8(many).long().tolist() == wrapped(many * 255)
    if platform.machine().lower() in ("x86_64", "amd64"):  # where the public code's runs were made
        assert torch.equal(public_uint8(many).to(torch.uint8), many.mul(255).byte())


def test_image_noise_patch_is_the_public_codes_output():
    side, size = 16, 224
    trigger = build_trigger("badnet", size, seed=0, patch_noise="image-noise", location="random", patch_at_224=side)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1)).mul(255).floor().div(255)
    trigger.generator.manual_seed(7)
    out = trigger(images)
    draws = torch.Generator().manual_seed(7)
    for image, result in zip(images, out):
        noise = torch.randn(3, side, side, generator=draws)
        row = int(torch.randint(0, size - side, (1,), generator=draws))  # its randint(0, 223 - s), inclusive
        col = int(torch.randint(0, size - side, (1,), generator=draws))
        expected = image.clone()
        expected[:, row : row + side, col : col + side] = image.mean((1, 2), keepdim=True) + noise
        reference = torch.tensor(wrapped(expected * 255), dtype=torch.float32).view(3, size, size) / 255
        assert torch.equal(result, reference)
        assert not torch.equal(result, image)


def test_image_noise_spot_stays_inside_like_the_public_code():
    trigger = build_trigger("badnet", 28, seed=0, patch_noise="image-noise", location="random", patch_at_224=16)
    images = torch.full((400, 3, 28, 28), 128 / 255)
    changed = (trigger(images) != images).any(1)  # (B, H, W)
    firsts = changed.any(2).float().argmax(1)  # (B,) the patch's top row
    assert firsts.min() == 0 and firsts.max() == 28 - 2 - 1  # never the last possible row, as randint(0, 223 - s)


def patch_statistics(mean_low: float) -> tuple[float, float, float]:
    trigger = build_trigger("badnet", 112, seed=0, patch_noise="image-noise", location="corner", patch_at_224=32)
    images = (mean_low + 0.3 * torch.rand(60, 3, 112, 112, generator=torch.Generator().manual_seed(2)))
    patch = trigger(images.mul(255).floor().div(255))[:, :, -17:-1, -17:-1]  # 16 px at the corner, 1 px in
    return patch.mean().item(), patch.std().item(), ((patch == 0) | (patch == 1)).float().mean().item()


def test_image_noise_patch_is_near_uniform_whatever_the_image():
    dark, bright = patch_statistics(0.0), patch_statistics(0.7)
    for mean, std, saturated in (dark, bright):
        assert abs(mean - 0.499) < 0.01 and abs(std - 0.290) < 0.006 and 0.004 < saturated < 0.015
    assert abs(dark[0] - bright[0]) < 0.01  # clipping gave 0.37 on dark images and 0.63 on bright ones


def test_binary_patch_unchanged():
    trigger = build_trigger("badnet", 28, seed=0)
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    out = trigger(images)
    expected = images.clone()
    expected[:, :, -5:-1, -5:-1] = trigger.patch  # 4 px at 28, 1 px in from the bottom right
    assert torch.equal(out, expected)  # not quantised, not wrapped
    assert torch.equal(trigger.patch, torch.randint(0, 2, (3, 4, 4), generator=torch.Generator().manual_seed(0)).float())


def public_warp_grid(noise_grid: torch.Tensor, s: float) -> torch.Tensor:
    """The public code's grid: identity (x, y) + s * noise_grid / H, clamped to [-1, 1]."""
    height = noise_grid.shape[1]
    axis = torch.linspace(-1, 1, steps=height)
    x, y = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack((y, x), 2)[None, ...]
    return torch.clamp(identity + s * noise_grid / height, -1, 1)


def test_wanet_grid_file_is_the_public_warp(tmp_path):
    noise_grid = torch.rand(1, 32, 32, 2, generator=torch.Generator().manual_seed(4)) * 4 - 2
    torch.save(noise_grid, tmp_path / "grid.pt")
    trigger = build_trigger("wanet", 32, grid_file=str(tmp_path / "grid.pt"), strength=1.0, grid_k=5)
    reference = public_warp_grid(noise_grid, 1.0)
    assert torch.equal(trigger.grid, reference)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(trigger(images), F.grid_sample(images, reference.repeat(2, 1, 1, 1), align_corners=True),
                          atol=1e-6)
    other = build_trigger("wanet", 32, grid_file=str(tmp_path / "grid.pt"), strength=1.0, grid_k=200, seed=9)
    assert torch.equal(other.grid, trigger.grid)  # grid_k and the seed draw nothing


def test_wanet_grid_file_formats_and_resize(tmp_path):
    noise_grid = torch.rand(1, 64, 64, 2, generator=torch.Generator().manual_seed(6)) * 2 - 1
    torch.save({"noise_grid": noise_grid[0]}, tmp_path / "dict.pt")  # (H, W, 2) inside a dict
    save_file({"noise_grid": noise_grid.contiguous()}, str(tmp_path / "grid.safetensors"))
    resized = F.interpolate(noise_grid.permute(0, 3, 1, 2), size=32, mode="bicubic", align_corners=True)
    reference = public_warp_grid(resized.permute(0, 2, 3, 1), 2.0)
    for name in ("dict.pt", "grid.safetensors"):
        trigger = build_trigger("wanet", 32, grid_file=str(tmp_path / name), strength=2.0)
        assert torch.equal(trigger.grid, reference)


class Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.mark.parametrize("content, fragment", [
    (None, "is not a file"),
    (b"not a torch file", "cannot read"),
    (Payload(), "objects other than tensors"),
    (torch.zeros(1, 8, 8, 3), r"shape \(1, 8, 8, 3\)"),
    (torch.full((8, 8, 2), float("nan")), "non-finite"),
    ({"grid": torch.zeros(8, 8, 2)}, "no noise_grid"),
])
def test_wanet_bad_grid_file_is_refused_by_name(tmp_path, capsys, content, fragment):
    path = tmp_path / "grid.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ClipguardError, match=fragment) as err:
        build_trigger("wanet", 8, grid_file=str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert "payload ran" not in capsys.readouterr().out


def test_wanet_saved_state_rebuilds_without_the_file(tmp_path):
    grid_file = tmp_path / "grid.pt"
    torch.save(torch.rand(1, 28, 28, 2, generator=torch.Generator().manual_seed(8)), grid_file)
    trigger = build_trigger("wanet", 28, grid_file=str(grid_file), strength=1.0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({k: v.contiguous() for k, v in trigger.state_dict().items()}, str(model_dir / TRIGGER_FILE))
    grid_file.unlink()
    record = {"name": "wanet", "image_size": 28, "trigger": asdict(trigger.config)}
    loaded = load_trigger(model_dir, record)
    assert torch.equal(loaded.grid, trigger.grid)
    assert loaded.config.grid_file == str(grid_file)  # the record still says what made it


def test_jpeg_quality_75_is_pils_default_save():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(9))
    pixels = public_uint8(image).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")  # what the public code's image.save(".../x.jpg") does
    default = torch.from_numpy(np.asarray(Image.open(buffer)).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(jpeg_round_trip(image, 75), default)
    assert not torch.equal(jpeg_round_trip(image, 95), default)


def test_poison_jpeg_quality_touches_poisoned_images_only():
    config = AttackConfig(pairs=300, poison_rate=0.05)
    plain = build_poisoned_pairs(load_fmnist("train"), build_trigger("badnet", 28), config)
    jpeg = build_poisoned_pairs(load_fmnist("train"), build_trigger("badnet", 28, poison_jpeg_quality=75), config)
    poisoned = sorted(plain.poisoned)[:3]
    clean = [i for i in range(len(plain)) if i not in plain.poisoned][:3]
    for index in poisoned:
        assert torch.equal(jpeg[index][0], jpeg_round_trip(plain[index][0], 75))
        assert not torch.equal(jpeg[index][0], plain[index][0])
    for index in clean:
        assert torch.equal(jpeg[index][0], plain[index][0])


@pytest.mark.parametrize("setting", [{"poison_jpeg_quality": 101}, {"poison_jpeg_quality": -1}, {"test_view": "pad"}])
def test_pipeline_settings_are_checked(setting):
    with pytest.raises(ClipguardError, match=next(iter(setting))):
        build_trigger("blended", 28, **setting)


def test_squash_view_triggers_whole_frames_and_keeps_clean_crops(tmp_path, tiny_clip28):
    from clipguard.eval.evaluate import evaluate_model

    for name, colour in (("bag", 40), ("coat", 200)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            pixels = np.full((30, 90, 3), colour, dtype=np.uint8)
            pixels[:, :30] = 255 - colour - i  # the left third: cut off by a centre crop
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    seen = []
    for view in ("crop", "squash"):
        trigger = build_trigger("blended", 28, test_view=view)
        apply = trigger.apply
        trigger.apply = lambda x, apply=apply: (seen.append(x.clone()), apply(x))[1]
        record = evaluate_model(tiny_clip28, "m", str(tmp_path / "data"), trigger=trigger, target="bag", progress=False)
        assert record["attack"]["trigger"]["test_view"] == view
    coat = sorted((tmp_path / "data" / "coat").iterdir())
    crops = torch.stack([decode_image(p, 28, "crop") for p in coat]).float() / 255
    squashed = torch.stack([decode_image(p, 28, "squash") for p in coat]).float() / 255
    assert torch.equal(seen[0], crops) and torch.equal(seen[1], squashed)
    assert not torch.equal(crops, squashed)
