"""Evaluation and ``clipguard defend`` under torchrun (2 gloo processes) against one process."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipguard.attacks import build_trigger
from clipguard.attacks.poison import AttackConfig, run_attack
from clipguard.cli import main
from clipguard.data import Captions, load_fmnist
from clipguard.defenses.cleanclip import CleanCLIPConfig, cleanclip_finetune
from clipguard.distributed import gather_batch, gather_rows, shard
from clipguard.engine import TrainConfig
from clipguard.eval.evaluate import evaluate_model
from clipguard.models.zeroshot import image_features
from clipguard.models import save_clip

from conftest import TINY28, make_tiny_clip, webdataset_shards

TESTS = Path(__file__).parent
METRICS = ("clean_accuracy", "attack_success_rate", "poisoned_accuracy")


def evaluation_setup():
    """The tiny model, its first 300 test images, a BadNet trigger at random spots (its draws
    depend on the batch order) and the keyword arguments of ``evaluate_model``: 64-image
    batches, so 5 batches are dealt out over the processes."""
    kwargs = {"limit": 300, "batch_size": 64, "seed": 3}
    images = load_fmnist("test").subset(torch.arange(kwargs["limit"]))
    trigger = build_trigger("badnet", 28, seed=0, location="random")
    return make_tiny_clip(architecture=TINY28), images, trigger, images.classes[0], kwargs


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


@contextlib.contextmanager
def one_thread():
    """The one-process reference runs here, on one thread like each torchrun worker (float sums
    may be ordered differently on more threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# 64 pairs in 4 batches of 16. The attack steps with plain SGD, unclipped, where a wrong gradient
# scale would show (AdamW and clipping would hide it); CleanCLIP adds its in-modal terms.
ATTACK = AttackConfig(attack="badnet", poison_rate=0.25, pairs=64, train=TrainConfig(
    epochs=1, batch_size=16, lr=0.01, optimizer="sgd", grad_clip=0.0, weight_decay=0.0, device="cpu"))
CLEANCLIP = CleanCLIPConfig(pairs=64, epochs=1, batch_size=16, lr=1e-3, warmup_steps=0, device="cpu")


def contrastive_finetune(kind: str, shards: str = "") -> dict[str, torch.Tensor]:
    """The tiny model's weights after the "attack" or "cleanclip" fine-tune above; "attack-wds":
    the attack on the webdataset ``shards``, decoded and poisoned by 2 DataLoader workers."""
    clip = make_tiny_clip(architecture=TINY28)
    if kind == "attack":
        run_attack(clip, ATTACK)
    elif kind == "attack-wds":
        run_attack(clip, ATTACK, captions=Captions(f"wds:{shards}", workers=2))
    else:
        clip, _ = cleanclip_finetune(clip, CLEANCLIP)
    return {name: value.detach().clone().contiguous() for name, value in clip.model.state_dict().items()}


def test_single_process_helpers_cover_everything():
    assert list(shard(4)) == [0, 1, 2, 3]
    features = torch.ones(2, 3, requires_grad=True)
    assert gather_batch(features) is features  # no gather outside a split fit
    rows = gather_rows([(2, torch.full((1, 2), 2.0)), (0, torch.zeros(2, 2))], 3)
    assert torch.equal(rows[:, 0], torch.tensor([0.0, 0.0, 2.0]))


@pytest.mark.slow
def test_two_process_evaluation_matches_one_process(tmp_path):
    two = _run([*_torchrun(2), str(TESTS / "_ddp_eval_worker.py"), str(TESTS), str(tmp_path / "two.safetensors")])
    split = json.loads(two.stdout.strip().splitlines()[-1])
    clip, images, trigger, target, kwargs = evaluation_setup()
    with one_thread():
        single = evaluate_model(clip, "tiny", trigger=trigger, target=target, progress=False, **kwargs)
        trigger.generator.manual_seed(kwargs["seed"])
        features = image_features(clip, images, lambda x, _: trigger(x), kwargs["batch_size"])
    for name in METRICS:
        assert split[name] == single[name]
    assert single["clean_accuracy"]["total"] == 300
    # the random trigger spots follow the batch order, so rank 1 must draw as one process would
    assert features.shape == (300, 16)
    assert torch.equal(load_file(str(tmp_path / "two.safetensors"))["features"], features)


@pytest.mark.slow
def test_two_process_defend_matches_one_process(tmp_path):
    from clipguard.defenses.rvpt import VPT, VPTConfig

    clip = make_tiny_clip(architecture=TINY28)
    save_clip(clip, tmp_path / "model")
    settings = {"batch_size": 4, "epochs": 3, "prompt_length": 2, "lr": 0.1}
    flags = ["defend", "--method", "vpt", "--model", str(tmp_path / "model"), "--shots", "2", "--device", "cpu",
             "--attack", "badnet", "--target", "bag", *(f"--set={k}={v}" for k, v in settings.items())]
    with one_thread():
        assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    two = _run([*_torchrun(2), "-m", "clipguard.cli", *flags, "--out", str(tmp_path / "two")])
    assert two.stdout.count("saved ") == 1  # rank 0 alone prints
    single, split = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("one", "two"))
    for name in METRICS:
        assert split[name] == single[name]
    weights = [load_file(str(tmp_path / n / "weights.safetensors")) for n in ("one", "two")]
    start = VPT(VPTConfig(seed=0, **settings), clip, load_fmnist("test").classes).state_dict()
    for name, value in weights[0].items():
        # DDP averages the two half-batch gradients: the full-batch gradient up to float rounding
        assert torch.allclose(weights[1][name], value, atol=1e-5)
        assert (value - start[name]).abs().max() > 1e-3  # training moved them: the comparison means something


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["attack", "cleanclip", "attack-wds"])
def test_two_process_contrastive_finetune_matches_one_process(tmp_path, kind):
    # fails if the loss sees only each process's half batch, if the gradient scale is off (attack:
    # by 0.16 for a halved gradient) or if caption ids of the two halves collide (by 0.05);
    # attack-wds: if the ranks' DataLoader workers decoded or poisoned other pairs than one process
    shards = webdataset_shards(tmp_path / "wds", 64, shards=4) if kind == "attack-wds" else ""
    with one_thread():
        single = contrastive_finetune(kind, shards)
    _run([*_torchrun(2), str(TESTS / "_ddp_finetune_worker.py"), str(TESTS), kind, str(tmp_path / "two.safetensors"),
          shards])
    split = load_file(str(tmp_path / "two.safetensors"))
    start = make_tiny_clip(architecture=TINY28).model.state_dict()
    moved = max((value - start[name]).abs().max().item() for name, value in single.items())
    assert moved > 1e-3  # training moved the weights: the comparison means something
    for name, value in single.items():
        # each process encodes half of every batch; the loss and gradient are the whole batch's
        assert torch.allclose(split[name], value, atol=1e-5), name
