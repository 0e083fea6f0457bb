#!/usr/bin/env bash
# Join this box to an edgefleet cluster as a worker node, run by systemd.
#
#   sudo deploy/join.sh redis://192.168.1.10:6379/0
#   sudo deploy/join.sh redis://:password@nas.lan:6379/0 --classes cpu,io --name minipc
#   sudo deploy/join.sh redis://nas.lan:6379/0 --source 'edgefleet==0.1.0'   # from a package index
#
# What it does (idempotent; rerun it to upgrade or change settings):
#   1. creates the system user `edgefleet` and a venv in /opt/edgefleet/venv
#   2. pip installs edgefleet[worker] (from this checkout by default)
#   3. writes /etc/edgefleet/worker.env (mode 0640: the Redis URL may hold a password)
#   4. installs and enables edgefleet-worker.service, then waits until it runs
# Undo: systemctl disable --now edgefleet-worker && rm -rf /opt/edgefleet /etc/edgefleet \
#       /etc/systemd/system/edgefleet-worker.service
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage 0 ;; esac

BROKER="$1"; shift
CLASSES=""
NAME="$(hostname -s 2>/dev/null || hostname)"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$SCRIPT_DIR/.." && pwd)"
SOURCE=""
PREFIX="${EDGEFLEET_PREFIX:-/opt/edgefleet}"
PYTHON="${PYTHON:-python3}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --classes) CLASSES="$2"; shift 2 ;;
        --name) NAME="$2"; shift 2 ;;
        --source) SOURCE="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage ;;
    esac
done

if [[ ! "$BROKER" =~ ^rediss?:// ]]; then
    echo "error: broker: expected a redis:// or rediss:// URL, got '$BROKER'" >&2
    exit 2
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: run as root (sudo), it installs a systemd unit" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: python: edgefleet needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
if [[ -z "$SOURCE" ]]; then
    if [[ -f "$CHECKOUT/pyproject.toml" ]]; then
        SOURCE="$CHECKOUT"
    else
        SOURCE="edgefleet"
    fi
fi
UNIT_SRC="$SCRIPT_DIR/edgefleet-worker.service"
[[ -f "$UNIT_SRC" ]] || { echo "error: $UNIT_SRC not found; run join.sh from an edgefleet checkout" >&2; exit 2; }

echo "==> user edgefleet"
if ! id edgefleet >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/edgefleet --create-home --shell /usr/sbin/nologin edgefleet
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
"$PREFIX/venv/bin/edgefleet" --help >/dev/null

echo "==> /etc/edgefleet/worker.env"
install -d -m 0750 -o root -g edgefleet /etc/edgefleet
umask 027
cat > /etc/edgefleet/worker.env.tmp <<ENV
# edgefleet worker settings (see the README's "Configuration"); written by join.sh
EDGEFLEET_REDIS_URL=$BROKER
EDGEFLEET_NODE_NAME=$NAME
EDGEFLEET_WORKER_METRICS_HOST=0.0.0.0
EDGEFLEET_WORKER_ARGS=${CLASSES:+--classes $CLASSES}
ENV
chown root:edgefleet /etc/edgefleet/worker.env.tmp
chmod 0640 /etc/edgefleet/worker.env.tmp
mv /etc/edgefleet/worker.env.tmp /etc/edgefleet/worker.env

echo "==> systemd unit edgefleet-worker.service"
sed "s#/opt/edgefleet/venv#$PREFIX/venv#g" "$UNIT_SRC" > /etc/systemd/system/edgefleet-worker.service
chmod 0644 /etc/systemd/system/edgefleet-worker.service
systemctl daemon-reload
systemctl enable edgefleet-worker.service
systemctl restart edgefleet-worker.service

for _ in $(seq 1 20); do
    if systemctl is-active --quiet edgefleet-worker.service; then
        echo "==> node '$NAME' joined ($BROKER). Logs: journalctl -u edgefleet-worker -f"
        echo "    It shows up in \`edgefleet workers\` within a few seconds."
        exit 0
    fi
    sleep 0.5
done
echo "error: edgefleet-worker did not start; see: journalctl -u edgefleet-worker -n 50" >&2
exit 1
