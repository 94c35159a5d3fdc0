#!/usr/bin/env bash
# Builds alignflow's CPU image with podman and runs a tiny pipeline inside it, with a work folder mounted at /work.
#   bash scripts/build_image.sh [WORK_DIR]      (WORK_DIR default: a new temporary folder; IMAGE=alignflow:cpu)
# Base image: python:3.11-slim when a registry serves it; otherwise a Debian bookworm root filesystem that
# mmdebstrap builds from Debian's packages (python3, python3-venv, python3-pip), imported as a local image.
# Needs podman, runc and mmdebstrap (Debian packages); pip inside the build reaches PyPI over the host's network.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-alignflow:cpu}
LOCAL_BASE=localhost/debian-py:bookworm
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
for tool in podman runc; do
  command -v "$tool" >/dev/null || { echo "build_image: $tool is not installed (apt-get install podman runc mmdebstrap)" >&2; exit 2; }
done

# crun cannot set RLIMIT_NOFILE on some hosts and rejects hybrid cgroups; runc with no default ulimits runs there
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
printf '[containers]\ndefault_ulimits = []\n' > "$conf"
export CONTAINERS_CONF=$conf
pod() { podman --runtime "$(command -v runc)" "$@"; }
now() { date +%s.%N; }

if pod image exists docker.io/library/python:3.11-slim || timeout 60 podman pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
  base=docker.io/library/python:3.11-slim
else
  base=$LOCAL_BASE
  if ! pod image exists "$base"; then
    command -v mmdebstrap >/dev/null || { echo "build_image: no base image can be pulled and mmdebstrap is not installed" >&2; exit 2; }
    echo "build_image: no registry image; building $base from Debian's packages (mmdebstrap)"
    rootfs=$(mktemp -d)
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs/rootfs.tar" http://deb.debian.org/debian </dev/null
    pod import -q "$rootfs/rootfs.tar" "$base" >/dev/null
    rm -rf "$rootfs"
  fi
fi

# torch's CPU build: from a local folder of wheels when pip is told of one (PIP_FIND_LINKS), else PyTorch's CPU index
build=(--network host --build-arg BASE="$base" -t "$IMAGE")
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  build+=(-v "$PIP_FIND_LINKS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_SPEC="torch==2.13.0")
else
  build+=(--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg TORCH_SPEC="torch==2.13.0+cpu")
fi
# behind a proxy that re-signs TLS, pip in the build needs the host's CA bundle: mounted for the build only
cert=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  build+=(-v "$cert:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
echo "build_image: building $IMAGE FROM $base"
start=$(now)
echo "+ podman build ${build[*]} ."
pod build -q "${build[@]}" . >/dev/null
built=$(now)

cp scripts/tiny_pipeline.yaml "$WORK/pipelines.yaml"
echo "+ podman run --rm --network host -v $WORK:/work $IMAGE run tiny"
pod run --rm --network host -v "$WORK:/work" "$IMAGE" run tiny
ran=$(now)
size=$(pod image inspect --format '{{.Size}}' "$IMAGE")
awk -v b="$start" -v m="$built" -v r="$ran" -v s="$size" 'BEGIN {
  printf "build_image: image %.0f MB, built in %.0f s; tiny pipeline in the image %.1f s\n", s / 1e6, m - b, r - m }'
