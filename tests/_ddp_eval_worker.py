"""Run by test_ddp under torchrun: evaluate a tiny CLIP with a trigger pasted at random spots;
rank 0 saves the triggered features (to argv[2]) and prints the record as JSON."""

import json
import sys

from safetensors.torch import save_file

sys.path.insert(0, sys.argv[1])  # tests/ directory, for the shared setup
from test_ddp import evaluation_setup  # noqa: E402

from clipguard.distributed import close_distributed, init_distributed, is_main_process  # noqa: E402
from clipguard.eval.evaluate import evaluate_model  # noqa: E402
from clipguard.models.zeroshot import image_features  # noqa: E402

init_distributed("cpu")
clip, images, trigger, target, kwargs = evaluation_setup()
record = evaluate_model(clip, "tiny", trigger=trigger, target=target, progress=False, **kwargs)
trigger.generator.manual_seed(kwargs["seed"])
features = image_features(clip, images, lambda x, _: trigger(x), kwargs["batch_size"])  # (N, D)
if is_main_process():
    save_file({"features": features.contiguous()}, sys.argv[2])
    print(json.dumps(record))
close_distributed()  # leave the group: a gloo group torn down at exit can abort the process
