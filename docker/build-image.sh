#!/usr/bin/env bash
# Build the component image, tagged with the package version: fedcmi:<version> (and REPO/fedcmi:<version>
# with --repo). Nothing from a container registry is needed: the base is docker/base-image.sh's.
#   docker/build-image.sh [--base IMAGE] [--ca FILE] [--mirror URL|DIR] [--repo REGISTRY/PATH]
#     --base    base image with python3 3.11 (default fedcmi-base:bookworm, built if missing)
#     --ca      CA bundle pip must trust (default: the one `pip config list` names), passed as a secret
#     --mirror  a PEP 503 package index tried besides PyPI; a local folder is served on loopback for the build
# Prints the tag, the image size and the build time.
set -euo pipefail
cd "$(dirname "$0")/.."
base=fedcmi-base:bookworm ca="" mirror="" repo=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    *) echo "build-image.sh: unknown option $1 (see the top of this script)" >&2; exit 2 ;;
  esac
done
version=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
tag=fedcmi:$version
if [ -z "$ca" ]; then
  ca=$(pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -n1)
fi
docker image inspect "$base" >/dev/null 2>&1 || docker/base-image.sh "$base"
args=(--network host -t "$tag" --build-arg "BASE_IMAGE=$base")
[ -n "$ca" ] && args+=(--secret "id=pip_ca,src=$ca")
server=""
if [ -n "$mirror" ] && [ -d "$mirror" ]; then
  # a fixed port: the mirror's URL is a build argument, and a new value would rebuild the torch layer
  port=${FEDCMI_MIRROR_PORT:-8765}
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$mirror" >/dev/null 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null' EXIT
  mirror=http://127.0.0.1:$port/simple
fi
[ -n "$mirror" ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=$mirror")
start=$(date +%s)
# the docker.io client: BuildKit secrets without buildx (a newer client on the PATH may want buildx)
client=$(command -v /usr/bin/docker || command -v docker)
DOCKER_BUILDKIT=1 "$client" build "${args[@]}" .
seconds=$(( $(date +%s) - start ))
[ -n "$repo" ] && docker tag "$tag" "$repo/$tag"
size=$(docker image inspect "$tag" --format '{{.Size}}')
echo "built $tag: $((size / 1000000)) MB in ${seconds} s"
