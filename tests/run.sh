#!/usr/bin/env bash
# Runs every Servitor test: unit, integration and end-to-end (real Docker,
# real QUIC, GitLab stand-in over real HTTP). Installs what the tests need
# when it is missing: git (sources are fetched over git's smart HTTP
# protocol) and Debian's busybox-static (the job image is built from it with
# `docker import`, since no registry is needed).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v git >/dev/null 2>&1 || need_apt+=(git)
# A dynamically linked busybox cannot run in an empty image: ldd succeeds
# only on dynamic executables.
if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  need_apt+=(busybox-static)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
if ! docker info >/dev/null 2>&1; then
  echo "error: the Docker engine is not reachable (docker info failed); the end-to-end tests need it." >&2
  exit 1
fi

# The end-to-end tests start the built binaries: build them first.
cargo build --workspace --bins
cargo test --workspace --all-targets "$@"
