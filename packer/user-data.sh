#!/bin/bash
# user-data for a Servitor agent instance launched from the servitor-agent
# image: writes the agent's configuration and starts the agent.
#
# Fill in the values below (or export them before running the script; the
# environment wins). Nothing secret goes here: the agent enrolls with the
# instance's identity document, which AWS signs (ENROLL=aws-iid, the
# default). Instance metadata serves user-data to anything on the instance
# that can reach it: see packer/README.md.
set -euo pipefail

# The coordinator's agent link, host:port (UDP).
COORDINATOR="${COORDINATOR:-coordinator.internal:7443}"
# Pin of the coordinator's CA, "sha256:" + 64 hex digits. The coordinator logs
# it at start (ca_pin on "agent link listening"), or compute it on the
# coordinator: openssl x509 -in /var/lib/servitor/ca.pem -outform DER | sha256sum
CA_SHA256="${CA_SHA256:-sha256:REPLACE-WITH-THE-PIN}"
# How the agent enrolls: aws-iid (its instance identity; the coordinator
# needs [agents.aws_iid]) or join-token (then JOIN_TOKEN holds the content
# of the coordinator's agents.join_token_file, readable by anything that
# reads user-data).
ENROLL="${ENROLL:-aws-iid}"
JOIN_TOKEN="${JOIN_TOKEN:-}"
# Jobs this instance runs at once (the coordinator's fleet.capacity_per_instance).
CAPACITY="${CAPACITY:-1}"
# Image for jobs that name none.
DEFAULT_IMAGE="${DEFAULT_IMAGE:-debian:bookworm-slim}"
# true runs job and service containers privileged, as Docker-in-Docker
# needs; a privileged job controls its whole instance.
PRIVILEGED="${PRIVILEGED:-false}"
# The coordinator's runner (a [[runners]] name) whose jobs this instance
# takes: one launch template per runner's group. Empty when the coordinator
# serves one runner.
RUNNER="${RUNNER:-}"

# For tests: write somewhere else, and leave systemd alone.
SERVITOR_ETC="${SERVITOR_ETC:-/etc/servitor-agent}"
SERVITOR_NO_SYSTEMCTL="${SERVITOR_NO_SYSTEMCTL:-0}"

AGENT_USER=servitor-agent
STATE_DIR=/var/lib/servitor-agent

fail() {
    echo "servitor user-data: $*" >&2
    exit 1
}

# The values land in TOML strings; a quote, a backslash or a control
# character would break out of them.
check_plain() {
    local name=$1 value=$2
    if [[ -z $value ]]; then
        fail "$name is empty; set it at the top of the user-data script"
    fi
    if [[ $value == *[\"\\]* || $value == *[[:cntrl:]]* ]]; then
        fail "$name must not contain quotes, backslashes or control characters"
    fi
}

check_plain COORDINATOR "$COORDINATOR"
if [[ ! $COORDINATOR =~ ^.+:[0-9]{1,5}$ ]]; then
    fail "COORDINATOR \"$COORDINATOR\" must be host:port, e.g. coordinator.internal:7443"
fi
if [[ ! $CA_SHA256 =~ ^sha256:[0-9a-fA-F]{64}$ ]]; then
    fail "CA_SHA256 \"$CA_SHA256\" must be \"sha256:\" followed by 64 hex digits; copy ca_pin from the coordinator's start-up log"
fi
case $ENROLL in
aws-iid)
    if [[ -n ${JOIN_TOKEN//[[:space:]]/} ]]; then
        fail "JOIN_TOKEN is set but ENROLL is aws-iid; remove the token from user-data (it is readable there)"
    fi
    ;;
join-token)
    if [[ -z ${JOIN_TOKEN//[[:space:]]/} ]]; then
        fail "JOIN_TOKEN is empty; set it to the content of the coordinator's agents.join_token_file, or use ENROLL=aws-iid"
    fi
    ;;
*)
    fail "ENROLL \"$ENROLL\" must be aws-iid or join-token"
    ;;
esac
if [[ ! $CAPACITY =~ ^[1-9][0-9]*$ ]]; then
    fail "CAPACITY \"$CAPACITY\" must be a whole number of at least 1"
fi
check_plain DEFAULT_IMAGE "$DEFAULT_IMAGE"
if [[ $PRIVILEGED != true && $PRIVILEGED != false ]]; then
    fail "PRIVILEGED \"$PRIVILEGED\" must be true or false"
fi
if [[ -n $RUNNER && ! $RUNNER =~ ^[A-Za-z0-9._-]{1,40}$ ]]; then
    fail "RUNNER \"$RUNNER\" must be the name of one of the coordinator's [[runners]] (1 to 40 letters, digits, '-', '_' or '.')"
fi

# Only root on an instance built from the image can hand files to the
# agent's user; a test run as anyone else keeps them its own.
owner=""
if [[ $(id -u) -eq 0 ]] && getent passwd "$AGENT_USER" >/dev/null; then
    owner=$AGENT_USER
fi

mkdir -p "$SERVITOR_ETC"

# Written next to the target and renamed, so the agent never reads half a
# file, and the token is never readable by others, not even briefly.
write_file() {
    local path=$1 mode=$2 file_owner=$3 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -n $file_owner ]]; then
        chown "$file_owner:" "$tmp"
    fi
    mv -f "$tmp" "$path"
}

if [[ $ENROLL == join-token ]]; then
    printf '%s\n' "$JOIN_TOKEN" | write_file "$SERVITOR_ETC/join-token" 0600 "$owner"
    enroll_line="join_token_file = \"$SERVITOR_ETC/join-token\""
else
    enroll_line='enroll = "aws-iid"'
fi
runner_line=""
if [[ -n $RUNNER ]]; then
    runner_line="runner = \"$RUNNER\""
fi

# Every key here must be one agent/src/config.rs accepts: unknown keys are
# errors. tests/tests/packer.rs parses the result with the agent's loader.
write_file "$SERVITOR_ETC/agent.toml" 0644 "" <<EOF
# Written by user-data at first boot.
coordinator = "$COORDINATOR"
ca_sha256 = "$CA_SHA256"
$enroll_line
state_dir = "$STATE_DIR"
capacity = $CAPACITY
$runner_line

[executor]
kind = "docker"
default_image = "$DEFAULT_IMAGE"
privileged = $PRIVILEGED
pull_policy = "if-not-present"
work_dir = "$STATE_DIR/builds"

[instance]
imds = true
EOF

echo "servitor user-data: wrote $SERVITOR_ETC/agent.toml (coordinator $COORDINATOR, capacity $CAPACITY)"

if [[ $SERVITOR_NO_SYSTEMCTL == 1 ]]; then
    exit 0
fi
systemctl enable --now servitor-agent.service
