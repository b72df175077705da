#!/bin/bash
# Provisions the Servitor agent image on Debian 12. Packer runs it as root
# after uploading the agent binary and its systemd unit to $UPLOAD_DIR, and
# removes the uploads afterwards. Running it again with the same uploads
# changes nothing.
set -euo pipefail

UPLOAD_DIR="${UPLOAD_DIR:-/tmp/servitor-image}"
AGENT_USER=servitor-agent
STATE_DIR=/var/lib/servitor-agent
ETC_DIR=/etc/servitor-agent

if [[ $(id -u) -ne 0 ]]; then
    echo "provision.sh: run as root (packer runs it with sudo)" >&2
    exit 1
fi
for f in servitor-agent servitor-agent.service; do
    if [[ ! -f "$UPLOAD_DIR/$f" ]]; then
        echo "provision.sh: $UPLOAD_DIR/$f is missing; upload it first or set UPLOAD_DIR" >&2
        exit 1
    fi
done

export DEBIAN_FRONTEND=noninteractive
apt-get update
# Without recommends, to keep needrestart and friends off the image. The
# Debian kernel enables AppArmor, and Docker cannot start containers there
# without the apparmor parser. git fetches job sources on the host.
apt-get install -y --no-install-recommends \
    docker.io apparmor ca-certificates git xz-utils
apt-get clean
rm -rf /var/lib/apt/lists/*
systemctl enable docker.service

if ! getent passwd "$AGENT_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin "$AGENT_USER"
fi
# The agent drives the Docker engine through its socket.
usermod --append --groups docker "$AGENT_USER"

install -d -m 0700 -o "$AGENT_USER" -g "$AGENT_USER" "$STATE_DIR"
install -d -m 0755 -o root -g root "$ETC_DIR"
install -m 0755 -o root -g root "$UPLOAD_DIR/servitor-agent" /usr/local/bin/servitor-agent
install -m 0644 -o root -g root "$UPLOAD_DIR/servitor-agent.service" \
    /etc/systemd/system/servitor-agent.service

# A binary built against a newer glibc than the image's fails here, at build
# time, instead of on every instance.
/usr/local/bin/servitor-agent --version

# Not enabled: the image has no configuration yet. user-data writes it and
# enables the unit.
systemctl daemon-reload
