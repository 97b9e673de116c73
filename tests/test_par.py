"""PAR: the capped repulsion, the perturbation, and that the repulsion moves the model away from the suspect."""

import json

import torch

from clipguard.cli import main
from clipguard.data import load_fmnist
from clipguard.defenses.par import PARConfig, capped, par_finetune, perturb

from conftest import TINY28, make_tiny_clip


def test_the_repulsion_stops_past_tau_and_then_has_no_gradient():
    below, above = torch.tensor(1.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    assert capped(below, 2.15).item() == 1.0 and capped(above, 2.15).item() == 0.0
    (capped(below, 2.15) + capped(above, 2.15)).backward()
    assert below.grad.item() == 1.0 and above.grad.item() == 0.0


def test_the_perturbation_is_seeded_bounded_and_optional():
    image = load_fmnist("test").float_images(torch.tensor([0]))[0]
    config = PARConfig(noise_p=1.0, erase_p=1.0)
    a = perturb(image, torch.Generator().manual_seed(3), config)
    b = perturb(image, torch.Generator().manual_seed(3), config)
    assert torch.equal(a, b) and not torch.equal(a, image) and a.min() >= 0 and a.max() <= 1
    assert (a >= image - 1e-6).float().mean() > 0.9  # the noise is clipped at 0: it only brightens (or erases)
    off = PARConfig(noise_p=0.0, erase_p=0.0)
    assert torch.equal(perturb(image, torch.Generator().manual_seed(3), off), image)


def _distance(tuned, suspect, images):
    with torch.no_grad():
        return (tuned.encode_image(images, normalize=True) - suspect.encode_image(images, normalize=True)).pow(2).sum(-1).mean()


def test_the_repulsion_drives_the_model_away_from_the_frozen_suspect():
    suspect = make_tiny_clip(architecture=TINY28)
    images = load_fmnist("test").float_images(torch.arange(64))
    settings = dict(pairs=64, epochs=2, batch_size=32, lr=1e-3, warmup_steps=0, device="cpu")
    repelled, stats = par_finetune(suspect, PARConfig(**settings))
    plain, _ = par_finetune(suspect, PARConfig(repel_weight=0.0, **settings))
    strong, _ = par_finetune(suspect, PARConfig(repel_weight=2.0, **settings))
    assert stats["steps"] == 4 and stats["method"] == "par"
    # the same fine-tune moves further from the suspect the stronger the repulsion
    assert _distance(plain, suspect, images) < _distance(repelled, suspect, images) < _distance(strong, suspect, images)
    again, _ = par_finetune(suspect, PARConfig(**settings))
    for (name, p), q in zip(repelled.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(p, q), name  # same seed, same weights


def test_defend_par_writes_a_model_directory(tmp_path, model_dir, capsys):
    out = tmp_path / "par"
    assert main(["defend", "--method", "par", "--model", str(model_dir), "--set", "pairs=32", "--set", "epochs=1",
                 "--set", "batch_size=16", "--device", "cpu", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["defense"]["method"] == "par" and saved["defense"]["steps"] == 2
    assert "par: 32 clean pairs" in capsys.readouterr().out
