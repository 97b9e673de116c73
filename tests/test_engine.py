import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from clipguard.engine import EpochBatchSampler, TrainConfig, fit

TESTS = Path(__file__).parent


class RegressionTask(nn.Module):
    """Mean squared error of a linear map: its full-batch gradient is the mean of per-sample ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        return ((self.linear(x) - y) ** 2).mean()


def regression_data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


def _config(**kw):
    base = dict(epochs=2, batch_size=8, lr=0.02, grad_clip=0.0, optimizer="sgd", weight_decay=0.0, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def test_same_seed_same_weights_other_seed_other_weights():
    runs = []
    for seed in (0, 0, 1):
        task = RegressionTask()
        fit(task, regression_data(), _config(seed=seed))
        runs.append(task.linear.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_training_reduces_the_loss():
    task = RegressionTask()
    x, y = regression_data().tensors
    before = task((x, y)).item()
    fit(task, regression_data(), _config(epochs=10))
    assert task((x, y)).item() < 0.2 * before


class CrashingTask(RegressionTask):
    """Dies (like a killed process) when asked for its ``crash_at``-th loss."""

    def __init__(self, crash_at):
        super().__init__()
        self.calls, self.crash_at = 0, crash_at

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return super().forward(batch)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, optimizer):
    config = _config(epochs=3, optimizer=optimizer, lr=0.01, checkpoint_every=3, warmup_steps=2)
    straight = RegressionTask()
    fit(straight, regression_data(), config)
    with pytest.raises(KeyboardInterrupt):  # 4 steps per epoch: dies in epoch 2, after the step-6 checkpoint
        fit(CrashingTask(crash_at=8), regression_data(), config, run_dir=tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6
    resumed = RegressionTask()
    result = fit(resumed, regression_data(), config, run_dir=tmp_path, resume=True)
    assert result.steps == 12
    assert torch.equal(resumed.linear.weight, straight.linear.weight)


def test_sampler_skips_finished_batches_and_shards_ranks():
    from clipguard.distributed import DistInfo

    full = list(EpochBatchSampler(16, 4, seed=0))
    sampler = EpochBatchSampler(16, 4, seed=0)
    sampler.set_epoch(0, start_batch=2)
    assert list(sampler) == full[2:]
    halves = [list(EpochBatchSampler(16, 4, 0, DistInfo(rank, 2, rank))) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process():
    single = RegressionTask()
    fit(single, regression_data(), _config())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(TESTS / "_ddp_worker.py"), str(TESTS)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["count_sum"] == 3  # ranks 0 and 1 contributed 1 and 2
    assert torch.allclose(torch.tensor(result["weight"]), single.linear.weight.flatten(), atol=1e-5)
