"""Entry script used by tests/harness.py: init the process group (gloo, or ``MEGATRON_PAPO_TEST_BACKEND``, e.g.
``cpu:gloo,cuda:nccl`` for the GPU suite), call the target, write this rank's JSON result."""

import importlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch.distributed as dist

    backend = os.environ.get("MEGATRON_PAPO_TEST_BACKEND", "gloo")
    if "nccl" in backend:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    module, fn = spec["target"].split(":")
    result = getattr(importlib.import_module(module), fn)(**spec["kwargs"])
    rank = dist.get_rank()
    Path(spec["out_dir"], f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
