# syntax=docker/dockerfile:1
# megatron_papo on GPUs: NVIDIA's NGC PyTorch image (CUDA, PyTorch, Transformer Engine, apex, NCCL) plus pinned
# megatron-core, transformers and SGLang, and this project. Build and run:
#
#   docker build -t megatron-papo:0.1.0 .                                            # SGLang rollouts
#   docker build --build-arg ROLLOUT_ENGINE=vllm -t megatron-papo:0.1.0-vllm .     # vLLM rollouts (rollout.engine=vllm)
#   docker run --gpus all --ipc=host --shm-size=16g -v /models:/models -v "$PWD/runs":/runs megatron-papo:0.1.0 \
#       train --config papo_g_7b,layouts/7b_8gpu model.path=/models/Qwen2.5-VL-7B-Instruct run_dir=/runs/papo_g_7b
#   docker run ... megatron-papo:0.1.0 convert mcore2hf --ckpt /runs/papo_g_7b --hf-base /models/Qwen2.5-VL-7B-Instruct --out /runs/hf
#
# Multi-node: launch/slurm.sbatch (CONTAINER_IMAGE=...) or launch/k8s/megatron-papo.yaml run launch/torchrun_multinode.sh
# inside this image. CI cannot build or run it (no docker daemon, no GPU); tests/unit/test_docker_pins.py checks the
# pins below against setup.py and launch/requirements-cpu.txt.
#
# The base image's torch, Transformer Engine and apex are kept (they are built together); every other package resolves
# around them (constraints file). The rollout engines pin torch exactly (sglang 0.5.23: torch==2.14.1, vllm 0.33.0:
# torch==2.14.0; sglang's kernels sglang-kernel, sgl-flash-mla, sgl-deep-ep too), which the base's own 2.14 build never satisfies, so an engine and such
# kernels are installed without dependencies and their other requirements after them, minus the torch family
# (launch/docker/engine_requirements.py): the base must therefore
# carry PyTorch 2.14 (the engines' CUDA kernels are built per torch minor version). The build stops if it does not.
# SGLang and vLLM cannot share one environment (exact pins clash: xgrammar, openai, numba, compressed-tensors,
# flashinfer), so each gets its own image: --build-arg ROLLOUT_ENGINE=sglang (default) or vllm.
# tests/unit/test_docker_pins.py resolves every stage's installs with pip against a stand-in of the base's torch stack.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
ARG ROLLOUT_ENGINE=sglang

FROM ${BASE_IMAGE} AS base

ARG TORCH_MINOR=2.14
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMERS_VERSION=5.19.0
# hadolint ignore=DL3064
ARG TOKENIZERS_VERSION=0.23.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SGLANG_VLM_CACHE_SIZE_MB=0 \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# keep the base's torch stack fixed; fail early if its torch minor differs from the one the engines are built for
RUN python -c "import sys, torch; v = '.'.join(torch.__version__.split('.')[:2]); \
sys.exit(0 if v == '${TORCH_MINOR}' else f'base image has torch {torch.__version__}, the engines need ${TORCH_MINOR}.x: pick another BASE_IMAGE')" \
 && pip list --format=freeze | grep -iE '^(torch|torchvision|transformer[-_]engine|apex|flash[-_]attn|triton)==' > /etc/pip-constraints.txt \
 && cat /etc/pip-constraints.txt

RUN pip install -c /etc/pip-constraints.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
        "tokenizers==${TOKENIZERS_VERSION}" \
        psutil datasets tensorboard mathruler pylatexenc pillow safetensors pyyaml tqdm qwen-vl-utils

COPY launch/docker/engine_requirements.py /opt/engine_requirements.py

FROM base AS engine-sglang
ARG SGLANG_VERSION=0.5.23
# the router of server fleets (rollout.mode=server, rollout/router.py)
ARG SGLANG_ROUTER_VERSION=0.3.2
RUN pip install --no-deps "sglang==${SGLANG_VERSION}" \
 && python /opt/engine_requirements.py --torch-pinned sglang > /tmp/torch-pinned.txt \
 && if [ -s /tmp/torch-pinned.txt ]; then pip install --no-deps -r /tmp/torch-pinned.txt; fi \
 && python /opt/engine_requirements.py sglang > /tmp/engine-requirements.txt \
 && pip install -c /etc/pip-constraints.txt -r /tmp/engine-requirements.txt \
 && rm /tmp/torch-pinned.txt /tmp/engine-requirements.txt \
 && pip install -c /etc/pip-constraints.txt "sglang-router==${SGLANG_ROUTER_VERSION}" \
 && python -c "import sglang, sglang_router"

# the optional vLLM engine (rollout.engine=vllm): docker build --build-arg ROLLOUT_ENGINE=vllm .
FROM base AS engine-vllm
ARG VLLM_VERSION=0.33.0
RUN pip install --no-deps "vllm==${VLLM_VERSION}" \
 && python /opt/engine_requirements.py --torch-pinned vllm > /tmp/torch-pinned.txt \
 && if [ -s /tmp/torch-pinned.txt ]; then pip install --no-deps -r /tmp/torch-pinned.txt; fi \
 && python /opt/engine_requirements.py vllm > /tmp/engine-requirements.txt \
 && pip install -c /etc/pip-constraints.txt -r /tmp/engine-requirements.txt \
 && rm /tmp/torch-pinned.txt /tmp/engine-requirements.txt \
 && python -c "import vllm"

# hadolint ignore=DL3006
FROM engine-${ROLLOUT_ENGINE} AS final

# trackers (logging.backends=wandb,mlflow) and run reports (megatron-papo report): setup.py extras trackers, report
ARG WANDB_VERSION=0.31.0
ARG MLFLOW_SKINNY_VERSION=3.17.2
ARG MATPLOTLIB_VERSION=3.11.2
RUN pip install --no-cache-dir -c /etc/pip-constraints.txt "wandb==${WANDB_VERSION}" "mlflow-skinny==${MLFLOW_SKINNY_VERSION}" \
        "matplotlib==${MATPLOTLIB_VERSION}"

# the project (its own dependencies are all satisfied above; --no-deps keeps the torch stack untouched)
WORKDIR /opt/megatron_papo
COPY setup.py pyproject.toml README.md ./
COPY megatron_papo ./megatron_papo
COPY tools ./tools
COPY launch ./launch
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import megatron.core, transformers, megatron_papo.cli; print('imports ok')"

RUN groupadd --gid 1000 papo \
 && useradd --uid 1000 --gid papo --create-home --shell /bin/bash papo \
 && mkdir -p /runs /models \
 && chown -R papo:papo /runs /opt/megatron_papo
USER 1000:1000
WORKDIR /runs

ENTRYPOINT ["megatron-papo"]
CMD ["--help"]
