"""Packaging for megatron_papo (PAPO / GRPO / DAPO on Megatron-Core)."""

from setuptools import find_packages, setup

# Pins known to co-install and run on CPU-only Python 3.11 machines (launch/requirements-cpu.txt
# is the full set the bootstrap installs; these are the runtime requirements of the package).
INSTALL_REQUIRES = [
    "torch>=2.9,<=2.14.1",
    "transformers==5.19.0",
    "tokenizers==0.23.2",
    "megatron-core==0.16.1",
    "psutil",  # undeclared by megatron-core; torch_dist checkpoint saves hang without it
    "datasets",
    "tensorboard",
    "mathruler",
    "pylatexenc",  # imported by mathruler, not declared by it
    "pillow",
    "safetensors",
    "pyyaml",
    "tqdm",
]

EXTRAS_REQUIRE = {
    # The rollout engine. On CPU machines launch/setup_env.sh installs it and its CPU plumbing.
    "sglang": ["sglang==0.5.23", "sglang-router==0.3.2"],  # the router: server fleets (rollout/router.py)
    # GPU clusters: installed inside the NGC container (see Dockerfile), never on CPU machines.
    "gpu": ["transformer-engine[pytorch]>=2.8", "flash-attn>=2.7", "vllm>=0.11"],
    "dev": ["pytest", "pytest-timeout", "ruff"],
}

setup(
    name="megatron_papo",
    version="0.1.0",
    description="Perception-Aware Policy Optimization (PAPO), GRPO and DAPO for Qwen2.5-VL on Megatron-Core",
    packages=find_packages(include=["megatron_papo", "megatron_papo.*"]),
    package_data={"megatron_papo": ["fixtures/*.txt", "fixtures/*.jinja", "recipes/*.yaml"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["megatron-papo=megatron_papo.cli:main"]},
)
