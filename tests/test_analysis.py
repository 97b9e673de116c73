import json

import torch

from clipguard.cli import main
from clipguard.defenses import DefendedClip
from clipguard.eval.analysis import blur, colour_jitter, gaussian_noise, horizontal_flip, resistivity
from clipguard.models import save_clip


def test_perturbations_stay_in_range_and_are_seeded():
    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for perturb in (gaussian_noise, blur, colour_jitter, horizontal_flip):
        out = perturb(images)
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
        assert not torch.equal(out, images)
    assert torch.equal(colour_jitter(images, seed=1), colour_jitter(images, seed=1))
    assert (gaussian_noise(images) - images).abs().max() < 0.01  # std 0.001


def test_resistivity_is_one_for_an_identity_perturbation_and_lower_for_a_strong_one(tiny_clip28):
    model = DefendedClip(tiny_clip28)
    images = torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    result = resistivity(model, images, {"identity": lambda x: x, "flip": horizontal_flip})
    assert len(result["identity"]) == len(tiny_clip28.model.visual.transformer.resblocks)
    assert all(abs(v - 1) < 1e-5 for v in result["identity"])
    assert min(result["flip"]) < 0.9999


def test_analyze_cli_writes_the_figure_and_numbers(tmp_path, tiny_clip28):
    save_clip(tiny_clip28, tmp_path / "m")
    code = main(["analyze", "pr", "--model", str(tmp_path / "m"), "--attack", "blended", "--target", "bag",
                 "--images", "20", "--out", str(tmp_path / "pr.png"), "--tsne", str(tmp_path / "tsne.png"),
                 "--device", "cpu"])
    assert code == 0
    assert (tmp_path / "pr.png").stat().st_size > 0 and (tmp_path / "tsne.png").stat().st_size > 0
    saved = json.loads((tmp_path / "pr.json").read_text())
    assert set(saved["resistivity"]["suspect model"]) == {"noise", "blur", "jitter", "flip", "trigger"}
