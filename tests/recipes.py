"""The recipe x layout combinations the README shows (its recipe table and FP8 example), for the build tests.

Every runnable recipe under ``launch/configs/`` (all but ``paper_base``, which is only a base, and ``tiny_cpu``,
the CPU job) with every ``layouts/{3b,7b}_{2,4,8}gpu`` layout of its model size, each without and with
``layouts/fp8``. ``tests/unit/test_recipe_layouts.py`` checks that this list and the README name the same recipes.
"""

from __future__ import annotations

from pathlib import Path

from tests.harness import REPO

CONFIGS = REPO / "launch" / "configs"
NOT_CLUSTER_RECIPES = {"paper_base", "tiny_cpu"}
README_EXAMPLE = "papo_g_7b,layouts/7b_8gpu,layouts/fp8"
PUBLISHED = {"3b": "Qwen2.5-VL-3B", "7b": "Qwen2.5-VL-7B"}


def cluster_recipes() -> list[str]:
    """Recipe names of the paper's runs (``grpo_*``, ``papo_g_*``, ``papo_g_noref_*``, ``dapo_*``, ``papo_d_*``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in NOT_CLUSTER_RECIPES)


def size_of(recipe: str) -> str:
    """``3b`` or ``7b`` from a recipe or layout name."""
    size = Path(recipe).stem.split("_")[-1] if "gpu" not in recipe else Path(recipe).stem.split("_")[0]
    if size not in PUBLISHED:
        raise ValueError(f"cannot tell the model size of {recipe!r}")
    return size


def layouts(size: str) -> list[str]:
    """The GPU layouts of one model size, e.g. ``layouts/7b_8gpu``."""
    return sorted(f"layouts/{p.stem}" for p in (CONFIGS / "layouts").glob(f"{size}_*gpu.yaml"))


def gpus_of(layout: str) -> int:
    """Number of GPUs a layout is written for (``layouts/7b_8gpu`` -> 8)."""
    return int(Path(layout).stem.split("_")[1].removesuffix("gpu"))


def combinations() -> list[str]:
    """Every ``recipe,layout[,layouts/fp8]`` string, e.g. ``papo_g_7b,layouts/7b_8gpu,layouts/fp8``."""
    out = []
    for recipe in cluster_recipes():
        for layout in layouts(size_of(recipe)):
            out += [f"{recipe},{layout}", f"{recipe},{layout},layouts/fp8"]
    return out
