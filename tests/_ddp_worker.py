"""Run by test_engine under torchrun: fit a regression task, print rank 0's weights as JSON."""

import json
import sys

import torch

sys.path.insert(0, sys.argv[1])  # tests/ directory, for the shared task definition
from test_engine import RegressionTask, regression_data  # noqa: E402

from clipguard.distributed import all_reduce_sum, close_distributed, init_distributed  # noqa: E402
from clipguard.engine import TrainConfig, fit  # noqa: E402

task = RegressionTask()
config = TrainConfig(epochs=2, batch_size=8, lr=0.02, grad_clip=0.0, optimizer="sgd", weight_decay=0.0, device="cpu", seed=0)
fit(task, regression_data(), config)
info, _ = init_distributed("cpu")
counts = all_reduce_sum(torch.tensor([info.rank + 1]))
if info.is_main:
    print(json.dumps({"weight": task.linear.weight.flatten().tolist(), "count_sum": int(counts)}))
close_distributed()  # leave the group: a gloo group torn down at exit can abort the process
