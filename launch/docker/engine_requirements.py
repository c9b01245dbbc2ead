"""A rollout engine's requirements for the GPU image, split around the torch family the base image provides.

SGLang and vLLM pin torch exactly (sglang 0.5.23: torch==2.14.1, vllm 0.33.0: torch==2.14.0), and so do some of
their kernel packages (sglang 0.5.23 -> sgl-deep-ep, sgl-flash-mla, sglang-kernel: torch==2.14.1), while the NGC base image carries its
own build of the same minor (``2.14.0a0+...``), which no such pin accepts: pip would replace the base's torch, or
with the constraints file refuse to resolve. So the Dockerfile installs the engine and its torch-pinned kernels with
``--no-deps`` (their binaries are built for the same torch minor, which the build checks) and then everything else
they require, minus the torch family, constrained to the base's torch stack. ``tests/unit/test_docker_pins.py``
checks these lists with pip's resolver against a stand-in of that stack.

    python engine_requirements.py --torch-pinned sglang   # kernels to install with --no-deps (installed metadata)
    python engine_requirements.py sglang                  # the rest, for pip install -c constraints -r
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Iterable, Optional

#: packages the base image provides (built together with its torch); never reinstalled from PyPI
TORCH_FAMILY = frozenset({"torch", "torchvision", "torchaudio", "torchcodec", "triton", "pytorch-triton",
                          "transformer-engine", "apex", "flash-attn"})

#: direct requirements of an engine that pin torch to a release the base's build does not satisfy
TORCH_PINNED = frozenset({"sgl-deep-ep", "sgl-flash-mla", "sglang-kernel"})


def requirement_name(req: str) -> str:
    """The normalised project name of a PEP 508 requirement string."""
    return re.split(r"[ <>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _runtime(requires_dist: Iterable[str]) -> list[str]:
    return [r for r in requires_dist if "extra ==" not in r]


def torch_pinned(requires_dist: Iterable[str]) -> list[str]:
    """The engine's requirements on :data:`TORCH_PINNED` kernels (installed with ``--no-deps``)."""
    return [r for r in _runtime(requires_dist) if requirement_name(r) in TORCH_PINNED]


def engine_requirements(requires_dist: Iterable[str],
                        requires_of: Optional[Callable[[str], Iterable[str]]] = None) -> list[str]:
    """The engine's runtime requirements minus the torch family and the torch-pinned kernels, plus those kernels'
    own runtime requirements (``requires_of(name)``) minus the torch family. Markers are kept (pip evaluates them)."""
    reqs = _runtime(requires_dist)
    out = [r for r in reqs if requirement_name(r) not in TORCH_FAMILY | TORCH_PINNED]
    for r in torch_pinned(reqs):
        out += [d for d in _runtime(requires_of(requirement_name(r)) if requires_of else ())
                if requirement_name(d) not in TORCH_FAMILY and d not in out]
    return out


def main(argv: list[str]) -> int:
    import importlib.metadata as md

    args = [a for a in argv if a != "--torch-pinned"]
    if len(args) != 1:
        print("usage: engine_requirements.py [--torch-pinned] DISTRIBUTION", file=sys.stderr)
        return 2
    reqs = md.requires(args[0]) or []
    lines = torch_pinned(reqs) if "--torch-pinned" in argv else engine_requirements(reqs, lambda n: md.requires(n) or [])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
