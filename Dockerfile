# The component image for the Kubeflow pipeline: CUDA PyTorch, fedcmi installed, a non-root user.
#   docker build -t REGISTRY/fedcmi:0.1.0 . && docker push REGISTRY/fedcmi:0.1.0
#   fedcmi pipeline compile --image REGISTRY/fedcmi:0.1.0
#
# CUDA PyTorch comes from PyPI's regular torch / torchvision wheels, which carry their CUDA libraries:
# the pod needs only the node's NVIDIA driver (the device plugin mounts it). They go in a layer of
# their own, pinned to the versions pyproject.toml resolves to, so a code change does not reinstall them.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# git: dvc.api reads the prepared data from the project's git URL (pipeline --source dvc)
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
RUN pip install "torch==2.14.1" "torchvision==0.29.1"

WORKDIR /opt/fedcmi
COPY pyproject.toml README.md ./
COPY fedcmi ./fedcmi
COPY components ./components
COPY pipelines ./pipelines
RUN pip install ".[video]" && python -c "import fedcmi, components, pipelines, torchvision, av"

RUN useradd --create-home --uid 1000 fedcmi
USER fedcmi
WORKDIR /home/fedcmi
