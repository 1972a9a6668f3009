# The component image of the Kubeflow pipeline: Python 3.11, CUDA PyTorch, fedcmi and kfp installed,
# so components run with install_kfp_package=False (nothing is installed when a pod starts).
#   docker/build-image.sh            # tags fedcmi:<package version>; see the script for the options
#
# Layers from the slowest-changing up: the base, torch (several GB, pinned by build arguments), the
# package's dependencies (read from pyproject.toml), then the source. A source change rebuilds only
# the last layer. No `# syntax=` line: that would pull a frontend image, and no registry may be reachable.
ARG BASE_IMAGE=fedcmi-base:bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# A package mirror to try besides PyPI (an air-gapped cluster's devpi or Artifactory); empty for none.
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip --version

# The CA bundle pip must trust to reach the registry arrives as a BuildKit secret (never a layer):
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/fedcmi
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(d['dependencies'] + d['optional-dependencies']['video'] + ['setuptools>=77']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY fedcmi ./fedcmi
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import fedcmi, fedcmi_components, fedcmi_pipelines, kfp, torchvision, av; print('fedcmi image ok')"

RUN useradd --create-home --uid 1000 fedcmi
USER fedcmi
WORKDIR /home/fedcmi
