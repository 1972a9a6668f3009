# The component image for the Kubeflow pipeline: CUDA PyTorch, fedcmi installed, a non-root user.
#   docker build -t REGISTRY/fedcmi:0.1.0 . && docker push REGISTRY/fedcmi:0.1.0
#   fedcmi pipeline compile --image REGISTRY/fedcmi:0.1.0
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/fedcmi
COPY pyproject.toml README.md ./
COPY fedcmi ./fedcmi
COPY components ./components
COPY pipelines ./pipelines
# The base image's torch satisfies the requirement; pip adds the rest.
RUN pip install . && python -c "import fedcmi, components, pipelines, torchvision"

RUN useradd --create-home --uid 1000 fedcmi
USER fedcmi
WORKDIR /home/fedcmi
