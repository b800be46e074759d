#!/usr/bin/env bash
# Run `flowd run --config FILE` confined roughly the way flowd.service confines it, on a
# machine without systemd as PID 1: a private mount namespace with a read-only root,
# private /tmp, /home hidden, every capability dropped and no_new_privs set. It checks that
# the daemon and its forkserver process pool start under ProtectSystem=strict, PrivateTmp,
# ProtectHome, CapabilityBoundingSet= and NoNewPrivileges. (SystemCallFilter needs systemd.)
# Usage, as root: scripts/hardened-run.sh /path/readable/config.toml
set -euo pipefail
flowd=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/flowd
config=$(realpath "$1")
exec unshare --mount --propagation private bash -c '
    set -e
    config_text=$(cat "$2")  # read now: /tmp is about to be replaced
    mount --bind / / && mount -o remount,bind,ro /
    for dir in /usr /etc /var /opt /srv /work /root; do
        if mountpoint -q "$dir"; then mount -o remount,bind,ro "$dir"; fi
    done
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    mount -t tmpfs tmpfs /home
    mkdir /tmp/flowd && printf "%s\n" "$config_text" > /tmp/flowd/config.toml
    exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs \
        env -i PATH=/usr/bin:/bin HOME=/nonexistent PYTHONUNBUFFERED=1 \
        "$1" run --config /tmp/flowd/config.toml' _ "$flowd" "$config"
