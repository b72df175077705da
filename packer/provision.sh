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

# Job containers' output reaches GitLab through the agent; what Docker keeps
# of it on disk is only for debugging, so it is rotated instead of filling
# the root volume on a long-lived instance.
install -d -m 0755 -o root -g root /etc/docker
install -m 0644 -o root -g root /dev/stdin /etc/docker/daemon.json <<'EOF'
{
  "log-driver": "json-file",
  "log-opts": {
    "max-size": "10m",
    "max-file": "3"
  }
}
EOF
# The journal (the agent's log, and Docker's) gets a fixed share of the
# disk; the rest is for job images and sources.
install -d -m 0755 -o root -g root /etc/systemd/journald.conf.d
install -m 0644 -o root -g root /dev/stdin \
    /etc/systemd/journald.conf.d/60-servitor-agent.conf <<'EOF'
[Journal]
SystemMaxUse=500M
RuntimeMaxUse=100M
EOF

# A binary built against a newer glibc than the image's fails here, at build
# time, instead of on every instance.
/usr/local/bin/servitor-agent --version

# Enabled, but the unit runs only once user-data has written its
# configuration (ConditionPathExists): until then it is skipped at boot.
systemctl enable servitor-agent.service
# Only a running systemd reads unit files; building into a container or a
# chroot, there is none to tell.
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi
