"""``python -m megatron_papo.rollout._sglang_server_main ARGS``: ``python -m sglang.launch_server ARGS`` (the default
HTTP mode, same arguments) whose schedulers start through the CPU seeded-sampling plumbing
(``cpu_shim/seeded.py``) when ``SGLANG_USE_CPU_ENGINE=1``, so server engines honour per-request seeds on CPU like
the in-process ones. On GPU (or without that variable) it is exactly SGLang's launcher.
"""

from __future__ import annotations

import functools
import os
import sys


def main(argv: list[str]) -> None:
    """Parse SGLang's server arguments and run the HTTP server."""
    from sglang.launch_server import run_server
    from sglang.srt.entrypoints import http_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from megatron_papo.rollout.cpu_shim import seeded

    if seeded.install():  # run_server looks launch_server up at call time: hand it our scheduler entry point
        http_server.launch_server = functools.partial(http_server.launch_server,
                                                      run_scheduler_process_func=seeded.run_scheduler_process)
    load_plugins()
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main(sys.argv[1:])
