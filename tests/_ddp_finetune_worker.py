"""Run by test_ddp under torchrun: a contrastive fine-tune (argv[2]: "attack", "cleanclip" or
"attack-wds" on the shards argv[4]) of the tiny CLIP with split batches; rank 0 saves the weights to argv[3]."""

import sys

from safetensors.torch import save_file

sys.path.insert(0, sys.argv[1])  # tests/ directory, for the shared setup
from test_ddp import contrastive_finetune  # noqa: E402

from clipguard.distributed import close_distributed, init_distributed, is_main_process  # noqa: E402

init_distributed("cpu")
weights = contrastive_finetune(sys.argv[2], sys.argv[4] if len(sys.argv) > 4 else "")
if is_main_process():
    save_file(weights, sys.argv[3])
close_distributed()  # leave the group: a gloo group torn down at exit can abort the process
