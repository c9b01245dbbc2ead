"""CPU plumbing: a CPU engine's multimodal features travel to its scheduler inside the request (pickled), not
through one POSIX shared-memory segment per request.

Why: SGLang 0.5.23 chooses how its tokenizer manager hands multimodal tensors (pixel values) to the scheduler from
the node topology alone (``multimodal/transport.determine_tensor_transport_mode``: ``"cuda_ipc"`` on one node,
``"default"`` across nodes). For CPU tensors the one-node mode means ``mm_utils.ShmPointerMMData``: every request's
features are copied into a fresh shared-memory segment (create, ``posix_fallocate``, first-touch page faults), which
the scheduler opens, copies out and unlinks. Rollouts send one request per sample (per-sample seeds), so a prompt's
image crosses that way ``n`` times. Measured on the 2-core CI machine (tiny model, 64 prompts x 8 seeded samples of
16 tokens, one in-process engine under cProfile): the host spent 1.55 of its 4.0 CPU-seconds per round in
``wrap_shm_features``, the round took 5.6 s; with inline features 1.5 CPU-seconds and 3.3–4.0 s. Unprofiled, with
SGLang's preprocess cache as well, a 2-engine fleet generates 20–30% more tokens/s (README "Scaling",
``tools/bench/rollout_fleet.py``, whose output digests show the same outputs before and after).

What: :func:`install` marks the transport as SGLang's ``"default"`` (inline: the tensors are pickled with the
tokenized request, the path SGLang itself takes across nodes) in the process that creates the engine, before it
starts the scheduler, so the forked scheduler (``fork_start.py``) agrees; a scheduler that decided otherwise would
still accept inline tensors (``unwrap_shm_features`` passes plain tensors through). GPU engines never take this
path: there the features go on to the GPU and SGLang's own choice stands.
"""

from __future__ import annotations

import os


def install() -> bool:
    """Send multimodal features inline in this process (CPU engines only). Returns True when installed; False
    (nothing changed) without ``SGLANG_USE_CPU_ENGINE=1``."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return False
    from sglang.srt.managers import mm_utils

    mm_utils._is_default_tensor_transport = True
    return True
