#!/usr/bin/env bash
# `iom service install` under a real systemd: a Debian 12 root filesystem made with debootstrap
# (from Debian's archive; no image registry), imported into Docker, booted with systemd as
# PID 1 in a privileged container. Installs the node's system unit with the iom binary given
# (default target/debug/iom), waits until the service is active and the node answers, runs
# `iom doctor` and `iom service status`, then uninstalls.
#
#   scripts/systemd-container-check.sh [IOM_BINARY]      # as root; a few minutes the first time
#
# The root filesystem is cached in $IOM_SYSTEMD_ROOTFS (default /var/cache/iom-systemd-rootfs)
# and the image is tagged iom-systemd:local. Not part of CI (see docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="$(readlink -f "${1:-target/debug/iom}")"
ROOTFS="${IOM_SYSTEMD_ROOTFS:-/var/cache/iom-systemd-rootfs}"
IMAGE=iom-systemd:local
NAME="iom-systemd-check-$$"

[ "$(id -u)" -eq 0 ] || { echo "systemd-container-check: run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "systemd-container-check: no iom binary at $BIN" >&2; exit 1; }

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    if [ ! -x "$ROOTFS/lib/systemd/systemd" ]; then
        command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
        debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$ROOTFS" \
            http://deb.debian.org/debian
    fi
    tar -C "$ROOTFS" -c . | docker import - "$IMAGE"
fi

cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# All capabilities but CAP_SYS_RESOURCE (which a sandboxed Docker may not grant), no seccomp.
docker run -d --name "$NAME" --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined --cgroupns=host \
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
    -v "$BIN:/usr/local/bin/iom:ro" \
    "$IMAGE" /lib/systemd/systemd >/dev/null

ctr() { docker exec "$NAME" "$@"; }

for _ in $(seq 1 60); do
    state="$(ctr systemctl is-system-running 2>/dev/null || true)"
    case "$state" in running|degraded) break ;; esac
    sleep 0.5
done
echo "systemd in the container: ${state:-unknown}"

ctr iom --data-dir /var/lib/iom service install -- --no-mdns --listen /ip4/127.0.0.1/tcp/4646
for _ in $(seq 1 60); do
    if ctr iom --data-dir /var/lib/iom status --json >/dev/null 2>&1; then break; fi
    sleep 0.5
done
ctr systemctl is-active iom.service
ctr iom --data-dir /var/lib/iom service status
ctr iom --data-dir /var/lib/iom status | head -3
ctr iom --data-dir /var/lib/iom doctor || true
ctr systemctl show iom.service -p ExecStart -p ReadWritePaths -p ProtectSystem -p NoNewPrivileges
# The hardening holds, seen from inside the service's own mount namespace: /etc and /usr are
# read-only, the data dir is writable, /home is hidden.
pid="$(ctr systemctl show -p MainPID --value iom.service)"
if ctr nsenter -t "$pid" -m touch /etc/iom-probe 2>/dev/null; then
    echo "systemd-container-check: the service can write /etc" >&2; exit 1
fi
ctr nsenter -t "$pid" -m touch /var/lib/iom/probe
ctr nsenter -t "$pid" -m rm /var/lib/iom/probe
echo "inside the unit: /etc read-only, /var/lib/iom writable"
ctr iom --data-dir /var/lib/iom service uninstall
if ctr systemctl is-active iom.service >/dev/null 2>&1; then
    echo "systemd-container-check: iom.service still active after uninstall" >&2
    exit 1
fi
echo "systemd-container-check: ok"
