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
    # The optional vLLM engine (rollout.engine=vllm), GPU only: the newest vLLM built for the torch 2.14 minor whose
    # requirements accept transformers 5.19.0 / tokenizers 0.23.2. Its exact pins (xgrammar, openai, numba,
    # flashinfer, ...) clash with sglang's, so it cannot share an environment with the sglang extra: the Dockerfile
    # builds it as a separate image (--build-arg ROLLOUT_ENGINE=vllm).
    "vllm": ["vllm==0.33.0"],
    # GPU clusters: installed inside the NGC container (see Dockerfile), never on CPU machines.
    "gpu": ["transformer-engine[pytorch]>=2.8", "flash-attn>=2.7"],
    "dev": ["pytest", "pytest-timeout", "ruff"],
    # logging.backends=wandb / mlflow (mlflow-skinny: the tracking client and file store without the server stack)
    "trackers": ["wandb==0.31.0", "mlflow-skinny==3.17.2"],
    # megatron-papo report (PNG plots)
    "report": ["matplotlib==3.11.2"],
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
