#!/usr/bin/env bash
# Join this box to an edgefleet cluster as a worker node, run by systemd.
#
#   edgefleet token create --worker --name minipc          # on the router's box (admin): prints a token
#   sudo EDGEFLEET_JOIN_TOKEN=efj_... deploy/join.sh http://router.lan:8700 --name minipc
#   sudo deploy/join.sh http://router.lan:8700 --token-file /root/join-token --classes cpu,io
#   sudo EDGEFLEET_JOIN_TOKEN=efj_... deploy/join.sh http://router.lan:8700 --source 'edgefleet==0.1.0'
#
# A thin wrapper around `edgefleet worker --join` (idempotent; rerun it with a new token to rejoin):
#   1. installs edgefleet[worker] in a venv in /opt/edgefleet/venv (from this checkout by default;
#      --edgefleet PATH uses an edgefleet you installed yourself)
#   2. joins: the router makes this box's own Redis user; the broker and the router are checked;
#      the credentials go to <data dir>/node.env (mode 0600). If the join fails, it stops here,
#      with the reason, and installs nothing.
#   3. creates the system user `edgefleet`, writes /etc/edgefleet/worker.env (mode 0600) and
#      installs and starts edgefleet-worker.service, which reads both files (EnvironmentFile):
#      no secret on a command line. The join token itself is not kept.
# Undo: systemctl disable --now edgefleet-worker && rm -rf /opt/edgefleet /etc/edgefleet \
#       /var/lib/edgefleet /etc/systemd/system/edgefleet-worker.service   (and revoke the token)
set -euo pipefail

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage 0 ;; esac

ROUTER="$1"; shift
CLASSES=""
NAME="$(hostname -s 2>/dev/null || hostname)"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$SCRIPT_DIR/.." && pwd)"
SOURCE=""
EDGEFLEET=""
TOKEN_FILE=""
DATA_DIR="/var/lib/edgefleet"
PREFIX="${EDGEFLEET_PREFIX:-/opt/edgefleet}"
PYTHON="${PYTHON:-python3}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --classes) CLASSES="$2"; shift 2 ;;
        --name) NAME="$2"; shift 2 ;;
        --source) SOURCE="$2"; shift 2 ;;
        --edgefleet) EDGEFLEET="$2"; shift 2 ;;
        --token-file) TOKEN_FILE="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage ;;
    esac
done

if [[ "$ROUTER" =~ ^rediss?:// ]]; then
    echo "error: router: join.sh now takes the router's URL and a join token (edgefleet token create --worker), not a Redis URL" >&2
    exit 2
fi
if [[ ! "$ROUTER" =~ ^https?:// ]]; then
    echo "error: router: expected the router's http:// or https:// URL, got '$ROUTER'" >&2
    exit 2
fi
if [[ -z "$TOKEN_FILE" && -z "${EDGEFLEET_JOIN_TOKEN:-}" ]]; then
    echo "error: join token: set EDGEFLEET_JOIN_TOKEN or pass --token-file (make one with \`edgefleet token create --worker\`)" >&2
    exit 2
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: run as root (sudo), it installs a systemd unit" >&2
    exit 2
fi
UNIT_SRC="$SCRIPT_DIR/edgefleet-worker.service"
[[ -f "$UNIT_SRC" ]] || { echo "error: $UNIT_SRC not found; run join.sh from an edgefleet checkout" >&2; exit 2; }

if [[ -n "$EDGEFLEET" ]]; then
    [[ -x "$EDGEFLEET" ]] || { echo "error: --edgefleet: $EDGEFLEET is not an executable" >&2; exit 2; }
    BIN_DIR="$(cd "$(dirname "$EDGEFLEET")" && pwd)"
else
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: python: edgefleet needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 2
    fi
    if [[ -z "$SOURCE" ]]; then
        if [[ -f "$CHECKOUT/pyproject.toml" ]]; then SOURCE="$CHECKOUT"; else SOURCE="edgefleet"; fi
    fi
    echo "==> venv $PREFIX/venv, installing $SOURCE[worker]"
    mkdir -p "$PREFIX"
    [[ -x "$PREFIX/venv/bin/python" ]] || "$PYTHON" -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install --quiet --upgrade pip
    if [[ -e "$SOURCE" ]]; then
        SPEC="${SOURCE}[worker]"                       # a checkout or a wheel/sdist path
    elif [[ "$SOURCE" =~ ^([A-Za-z0-9_.-]+)(.*)$ ]]; then
        SPEC="${BASH_REMATCH[1]}[worker]${BASH_REMATCH[2]}"   # name[worker]==version
    else
        SPEC="$SOURCE"
    fi
    "$PREFIX/venv/bin/pip" install --quiet --upgrade "$SPEC"
    EDGEFLEET="$PREFIX/venv/bin/edgefleet"
    BIN_DIR="$PREFIX/venv/bin"
fi

echo "==> joining $ROUTER as '$NAME'"
# The token reaches `edgefleet` through this script's environment (exported by the caller) or a
# file: never an argument of any process here.
JOIN_ARGS=(worker --join "$ROUTER" --node-name "$NAME" --join-only)
[[ -n "$TOKEN_FILE" ]] && JOIN_ARGS+=(--token-file "$TOKEN_FILE")
mkdir -p "$DATA_DIR"
chmod 0700 "$DATA_DIR"
if ! EDGEFLEET_DATA_DIR="$DATA_DIR" "$EDGEFLEET" "${JOIN_ARGS[@]}"; then
    echo "error: the join failed (see the line above); nothing was installed" >&2
    exit 1
fi
unset EDGEFLEET_JOIN_TOKEN

echo "==> user edgefleet"
if ! id edgefleet >/dev/null 2>&1; then
    useradd --system --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin edgefleet
fi
chown -R edgefleet:edgefleet "$DATA_DIR"

echo "==> /etc/edgefleet/worker.env"
install -d -m 0750 -o root -g edgefleet /etc/edgefleet
umask 077
cat > /etc/edgefleet/worker.env.tmp <<ENV
# edgefleet worker settings (see the README's "Configuration"); written by join.sh.
# The credentials from the join are in $DATA_DIR/node.env (the unit reads both).
EDGEFLEET_NODE_NAME=$NAME
EDGEFLEET_WORKER_METRICS_HOST=0.0.0.0
EDGEFLEET_WORKER_ARGS=${CLASSES:+--classes $CLASSES}
ENV
chmod 0600 /etc/edgefleet/worker.env.tmp
mv /etc/edgefleet/worker.env.tmp /etc/edgefleet/worker.env

echo "==> systemd unit edgefleet-worker.service"
sed -e "s#/opt/edgefleet/venv/bin#$BIN_DIR#g" -e "s#/var/lib/edgefleet#$DATA_DIR#g" "$UNIT_SRC" \
    > /etc/systemd/system/edgefleet-worker.service
chmod 0644 /etc/systemd/system/edgefleet-worker.service
systemctl daemon-reload
systemctl enable edgefleet-worker.service
systemctl restart edgefleet-worker.service

for _ in $(seq 1 20); do
    if systemctl is-active --quiet edgefleet-worker.service; then
        echo "==> node '$NAME' joined $ROUTER. Logs: journalctl -u edgefleet-worker -f"
        echo "    It shows up in \`edgefleet workers\` within a few seconds."
        exit 0
    fi
    sleep 0.5
done
echo "error: edgefleet-worker did not start; see: journalctl -u edgefleet-worker -n 50" >&2
exit 1
