#!/usr/bin/env bash
# A Docker daemon on this machine, for building the component image and running the pipeline in it
# (kfp.local's Docker runner). Debian/Ubuntu, as root: installs docker.io and debootstrap when missing and
# starts dockerd in the background when no daemon answers. Logs to ${DOCKERD_LOG:-/tmp/dockerd.log}.
set -euo pipefail
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y docker.io debootstrap >/dev/null
fi
client=$(command -v /usr/bin/docker || command -v docker)
if ! "$client" info >/dev/null 2>&1; then
  nohup dockerd >"${DOCKERD_LOG:-/tmp/dockerd.log}" 2>&1 &
  for _ in $(seq 60); do "$client" info >/dev/null 2>&1 && break; sleep 1; done
fi
"$client" info --format 'docker daemon {{.ServerVersion}}, storage driver {{.Driver}}'
