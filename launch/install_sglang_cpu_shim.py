#!/usr/bin/env python
"""Install the CPU stand-in for ``sgl_kernel`` into a virtual environment (idempotent). CPU test plumbing.

    .venv/bin/python launch/install_sglang_cpu_shim.py          # installs into the running interpreter's venv
    .venv/bin/python launch/install_sglang_cpu_shim.py --check  # exit 1 if not installed / not working
    .venv/bin/python launch/install_sglang_cpu_shim.py --uninstall

It writes ONE file, ``<site-packages>/megatron_papo_sgl_kernel_cpu_shim.pth``. At interpreter start
(including SGLang's spawned subprocesses) that line puts ``megatron_papo/rollout/cpu_shim`` first
on ``sys.path`` only when ``SGLANG_USE_CPU_ENGINE=1``; otherwise it does nothing. The installed
``sglang-kernel`` wheel is not touched, so GPU machines (which never set the variable for CPU)
keep using it. Re-running rewrites the same file; moving the repository needs a re-run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "megatron_papo_sgl_kernel_cpu_shim.pth"
SHIM_DIR = Path(__file__).resolve().parents[1] / "megatron_papo" / "rollout" / "cpu_shim"


def pth_line(shim_dir: Path) -> str:
    """The single executable ``.pth`` line (site.py runs lines that start with ``import``)."""
    return (f"import os, sys; os.environ.get('SGLANG_USE_CPU_ENGINE') == '1' and {str(shim_dir)!r} not in sys.path "
            f"and sys.path.insert(0, {str(shim_dir)!r})\n")


def check(python: str) -> bool:
    """True when ``python`` imports the stand-in with the variable set and does not without it."""
    code = "import sgl_kernel, sys; sys.exit(0 if getattr(sgl_kernel, 'IS_MEGATRON_PAPO_CPU_SHIM', False) else 3)"
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    env.pop("PYTHONPATH", None)
    on = subprocess.run([python, "-c", code], env=env, capture_output=True, cwd="/").returncode == 0
    env["SGLANG_USE_CPU_ENGINE"] = "0"
    off = subprocess.run([python, "-c", code], env=env, capture_output=True, cwd="/").returncode != 0
    return on and off


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only verify the installation")
    ap.add_argument("--uninstall", action="store_true", help="remove the .pth file")
    args = ap.parse_args()
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / PTH_NAME
    if args.uninstall:
        pth.unlink(missing_ok=True)
        print(f"removed {pth}")
        return 0
    if not args.check:
        if not (SHIM_DIR / "sgl_kernel" / "__init__.py").is_file():
            print(f"error: stand-in source missing at {SHIM_DIR}/sgl_kernel", file=sys.stderr)
            return 2
        line = pth_line(SHIM_DIR)
        if not pth.exists() or pth.read_text() != line:
            pth.write_text(line)
        print(f"sgl_kernel CPU stand-in: {pth} -> {SHIM_DIR} (active only with SGLANG_USE_CPU_ENGINE=1)")
    ok = check(sys.executable)
    print("check:", "ok" if ok else "FAILED (with SGLANG_USE_CPU_ENGINE=1 `import sgl_kernel` must load the stand-in)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
