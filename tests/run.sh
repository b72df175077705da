#!/usr/bin/env bash
# Runs every Servitor test: unit, integration and end-to-end (real Docker,
# real QUIC, GitLab stand-in over real HTTP). Installs what the tests need
# when it is missing: git (sources are fetched over git's smart HTTP
# protocol), Debian's busybox-static (the job image is built from it with
# `docker import`, since no registry is needed), the tools that check what
# ships: shellcheck, systemd's systemd-analyze, packer, and debootstrap (the
# image provisioning runs in a Debian it makes), and moto, cfn-lint and
# checkov from PyPI in virtual environments.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v git >/dev/null 2>&1 || need_apt+=(git)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v packer >/dev/null 2>&1 || need_apt+=(packer)
# debootstrap lives in sbin, which a user's PATH may lack.
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
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

# The AWS fleet tests drive the real AWS SDK against moto's server. It is
# installed from PyPI into a virtual environment outside the clone, reused
# between runs and made anew when the pinned version changes.
MOTO_VERSION=5.2.5
MOTO_VENV="${SERVITOR_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/servitor-moto-$MOTO_VERSION}"
if ! [ -x "$MOTO_VENV/bin/moto_server" ]; then
  echo "installing moto[server]==$MOTO_VERSION into $MOTO_VENV"
  if ! python3 -m venv "$MOTO_VENV" >/dev/null 2>&1; then
    # Debian splits venv support into its own package.
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    rm -rf "$MOTO_VENV"
    python3 -m venv "$MOTO_VENV"
  fi
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
export SERVITOR_MOTO_SERVER="$MOTO_VENV/bin/moto_server"

# The deployable stack (deploy/servitor.yaml) is checked by cfn-lint and
# checkov, each pinned and in a virtual environment of its own beside
# moto's (their dependencies differ).
pip_tool() {
  local name=$1 version=$2 venv="${XDG_CACHE_HOME:-$HOME/.cache}/servitor-$1-$2"
  if ! [ -x "$venv/bin/$name" ]; then
    echo "installing $name==$version into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$name==$version"
  fi
  echo "$venv/bin/$name"
}
SERVITOR_CFN_LINT="$(pip_tool cfn-lint 1.58.0)"
SERVITOR_CHECKOV="$(pip_tool checkov 3.3.30)"
export SERVITOR_CFN_LINT SERVITOR_CHECKOV

# The end-to-end tests start the built binaries: build them first.
# --all-targets, as the tests below: the same features, so nothing is built twice.
cargo build --workspace --all-targets

# The Fargate tests run the agent inside the job's own image, which may have
# no C library at all (the test job image is busybox alone): the agent is
# built as a static executable there. With no musl target installed, that is
# glibc linked statically (static-pie), in a target directory of its own so
# its different RUSTFLAGS do not rebuild the one above.
STATIC_TARGET="${SERVITOR_STATIC_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/servitor-static-target}"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$STATIC_TARGET" \
  cargo build --locked -p servitor-agent --bin servitor-agent --target x86_64-unknown-linux-gnu
export SERVITOR_STATIC_AGENT="$STATIC_TARGET/x86_64-unknown-linux-gnu/debug/servitor-agent"

cargo test --workspace --all-targets "$@"
