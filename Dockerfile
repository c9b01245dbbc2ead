# syntax=docker/dockerfile:1
# megatron_papo on GPUs: NVIDIA's NGC PyTorch image (CUDA, PyTorch, Transformer Engine, apex, NCCL) plus pinned
# megatron-core, transformers and SGLang, and this project. Build and run:
#
#   docker build -t megatron-papo:0.1.0 .
#   docker run --gpus all --ipc=host --shm-size=16g -v /models:/models -v "$PWD/runs":/runs megatron-papo:0.1.0 \
#       train --config papo_g_7b,layouts/7b_8gpu model.path=/models/Qwen2.5-VL-7B-Instruct run_dir=/runs/papo_g_7b
#   docker run ... megatron-papo:0.1.0 convert mcore2hf --ckpt /runs/papo_g_7b --hf-base /models/Qwen2.5-VL-7B-Instruct --out /runs/hf
#
# Multi-node: launch/slurm.sbatch (CONTAINER_IMAGE=...) or launch/k8s/megatron-papo.yaml run launch/torchrun_multinode.sh
# inside this image. CI cannot build or run it (no docker daemon, no GPU); tests/unit/test_docker_pins.py checks the
# pins below against setup.py and launch/requirements-cpu.txt.
#
# The base image's torch, Transformer Engine and apex are kept (they are built together); every other package resolves
# around them (constraints file). SGLang pins torch==2.14.1 exactly, so it is installed without dependencies and its
# requirements minus the torch family are installed after it: the base must therefore carry PyTorch 2.14 (its
# CUDA kernels, sglang-kernel and flashinfer, are built per torch minor version). The build stops if it does not.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ARG TORCH_MINOR=2.14
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMERS_VERSION=5.19.0
# hadolint ignore=DL3064
ARG TOKENIZERS_VERSION=0.23.2
ARG SGLANG_VERSION=0.5.23
# vLLM is optional (rollout.engine=vllm): --build-arg VLLM_VERSION=<version matching the base's torch>
ARG VLLM_VERSION=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SGLANG_VLM_CACHE_SIZE_MB=0 \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# keep the base's torch stack fixed; fail early if its torch minor differs from the one SGLang is built for
RUN python -c "import sys, torch; v = '.'.join(torch.__version__.split('.')[:2]); \
sys.exit(0 if v == '${TORCH_MINOR}' else f'base image has torch {torch.__version__}, SGLang ${SGLANG_VERSION} needs ${TORCH_MINOR}.x: pick another BASE_IMAGE')" \
 && pip list --format=freeze | grep -iE '^(torch|torchvision|transformer[-_]engine|apex|flash[-_]attn|triton)==' > /etc/pip-constraints.txt \
 && cat /etc/pip-constraints.txt

RUN pip install -c /etc/pip-constraints.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
        "tokenizers==${TOKENIZERS_VERSION}" \
        psutil datasets tensorboard mathruler pylatexenc pillow safetensors pyyaml tqdm qwen-vl-utils

RUN pip install --no-deps "sglang==${SGLANG_VERSION}" \
 && python -c "import importlib.metadata as md, re; \
skip = {'torch', 'torchvision', 'torchaudio', 'torchcodec', 'triton'}; \
reqs = [r for r in (md.requires('sglang') or []) if 'extra ==' not in r]; \
print('\n'.join(r for r in reqs if re.split(r'[ <>=!~;\[]', r, maxsplit=1)[0].lower() not in skip))" > /tmp/sglang-requirements.txt \
 && pip install -c /etc/pip-constraints.txt -r /tmp/sglang-requirements.txt \
 && rm /tmp/sglang-requirements.txt \
 && if [[ -n "${VLLM_VERSION}" ]]; then pip install -c /etc/pip-constraints.txt "vllm==${VLLM_VERSION}"; fi

# the project (its own dependencies are all satisfied above; --no-deps keeps the torch stack untouched)
WORKDIR /opt/megatron_papo
COPY setup.py pyproject.toml README.md ./
COPY megatron_papo ./megatron_papo
COPY tools ./tools
COPY launch ./launch
RUN pip install --no-deps -e . \
 && python -c "import megatron.core, transformers, sglang, megatron_papo.cli; print('imports ok')"

RUN groupadd --gid 1000 papo \
 && useradd --uid 1000 --gid papo --create-home --shell /bin/bash papo \
 && mkdir -p /runs /models \
 && chown -R papo:papo /runs /opt/megatron_papo
USER 1000:1000
WORKDIR /runs

ENTRYPOINT ["megatron-papo"]
CMD ["--help"]
