#!/usr/bin/env bash
# A Docker engine, a base image and the platform's images on a machine with no Docker Hub (CI, this build farm):
#
#   deploy/docker/local-engine.sh start    start Debian's dockerd (root; data cached under $RLHF_DOCKER_ROOT)
#   deploy/docker/local-engine.sh base     local/python:3.11-bookworm from Debian's packages (debootstrap), once
#   deploy/docker/local-engine.sh build    rlhf:cpu (deploy/Dockerfile.cpu) on that base, torch from $TORCH_WHEELS,
#                                          and local/postgres:15-bookworm (deploy/docker/Dockerfile.postgres)
#   deploy/docker/local-engine.sh stop     stop the engine started by `start`
#   deploy/docker/local-engine.sh images   start, base and build (what `make images` runs; the engine keeps running)
#
# `start` prints the DOCKER_HOST to export. With an engine of your own (DOCKER_HOST answering, or Docker Desktop),
# skip start/stop; `build` with PYTHON_IMAGE=python:3.11-slim-bookworm and TORCH_WHEELS= uses the public base
# and PyTorch's CPU index instead.
set -euo pipefail

ROOT="${RLHF_DOCKER_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-docker}"
SOCKET="$ROOT/docker.sock"
BASE_IMAGE="${PYTHON_IMAGE:-local/python:3.11-bookworm}"
IMAGE="${IMAGE:-rlhf:cpu}"
POSTGRES_IMAGE="${POSTGRES_IMAGE:-local/postgres:15-bookworm}"
TORCH_WHEELS="${TORCH_WHEELS-/opt/wheels}"
MIRROR="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: \(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"

size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }
engine_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  if engine_answers; then echo "export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}"; return; fi
  export DOCKER_HOST="unix://$SOCKET"
  if engine_answers; then echo "export DOCKER_HOST=$DOCKER_HOST"; return; fi
  command -v dockerd >/dev/null || { echo "no dockerd: apt-get install -y --no-install-recommends docker.io iptables" >&2; exit 1; }
  mkdir -p "$ROOT/data"
  # exec-root holds the engine's runtime sockets: keep its path short (unix sockets are limited to 108 bytes).
  local exec_root="/tmp/rlhf-docker-$(id -u)"
  mkdir -p "$exec_root"
  nohup dockerd --data-root "$ROOT/data" --exec-root "$exec_root" -H "$DOCKER_HOST" \
    --pidfile "$ROOT/dockerd.pid" >"$ROOT/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do engine_answers && break; sleep 0.5; done
  engine_answers || { tail -20 "$ROOT/dockerd.log" >&2; exit 1; }
  echo "export DOCKER_HOST=$DOCKER_HOST"
}

stop() {
  [ -f "$ROOT/dockerd.pid" ] || return 0
  local pid; pid="$(cat "$ROOT/dockerd.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  rm -f "$ROOT/dockerd.pid"
}

base() {
  export DOCKER_HOST="${DOCKER_HOST:-unix://$SOCKET}"
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || { echo "no debootstrap: apt-get install -y debootstrap" >&2; exit 1; }
  local rootfs; rootfs="$(mktemp -d)"
  # bookworm's python3 is 3.11, the version the locks are made for; python-is-python3 gives `python` as in
  # the python:3.11-slim images the Dockerfiles name by default.
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >"$ROOT/debootstrap.log" 2>&1
  # This machine's trust store (its network may re-sign TLS) so that builds reach PyPI as the host does.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

build() {
  export DOCKER_HOST="${DOCKER_HOST:-unix://$SOCKET}"
  local args=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE") server=""
  if [ -n "$TORCH_WHEELS" ]; then
    # The CPU torch wheel from this machine's folder, served to the build over loopback (--network host), on
    # a fixed port: the URL is a build argument, and a new one would invalidate the cached layers.
    local port="${WHEELS_PORT:-18765}"
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$TORCH_WHEELS" >/dev/null 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' RETURN
    args+=(--build-arg TORCH_INDEX_URL= --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
  fi
  local start=$SECONDS
  # The classic builder (Debian's engine has no buildx): .dockerignore at the root limits the context for all.
  DOCKER_BUILDKIT=0 docker build --network host -q -f "$REPO/deploy/Dockerfile.cpu" "${args[@]}" -t "$IMAGE" "$REPO" >/dev/null
  echo "$IMAGE built in $((SECONDS - start)) s, $(size "$IMAGE")"
  start=$SECONDS
  # The CUDA image up to the CUDA packages (they come from PyPI, ~3 GB: `docker build -f deploy/Dockerfile.cuda`
  # on a machine meant for it builds the whole image).
  DOCKER_BUILDKIT=0 docker build --network host -q -f "$REPO/deploy/Dockerfile.cuda" --target deps \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -t rlhf:cuda-deps "$REPO" >/dev/null
  echo "rlhf:cuda-deps (Dockerfile.cuda up to the CUDA packages) built in $((SECONDS - start)) s, $(size rlhf:cuda-deps)"
  start=$SECONDS
  DOCKER_BUILDKIT=0 docker build --network host -q -f "$REPO/deploy/docker/Dockerfile.postgres" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$POSTGRES_IMAGE" "$REPO" >/dev/null
  echo "$POSTGRES_IMAGE built in $((SECONDS - start)) s, $(size "$POSTGRES_IMAGE")"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  base) base ;;
  build) build ;;
  images) eval "$(start)"; base; build ;;
  *) sed -n "2,13p" "$0"; exit 2 ;;
esac
