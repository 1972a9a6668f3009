#!/usr/bin/env bash
# Build a minimal Debian base image with Python 3.11 from Debian's packages, for machines that
# reach a Debian mirror but no container registry (no `python:3.11-slim` to pull).
#   docker/base-image.sh [TAG] [MIRROR]
# then: docker/build-image.sh --base TAG
set -euo pipefail
tag=${1:-fedcmi-base:bookworm}
mirror=${2:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install -y debootstrap)" >&2; exit 2; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,git \
  bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag"
docker run --rm "$tag" python3 --version
