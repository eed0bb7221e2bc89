#!/usr/bin/env bash
# Installs what Berth needs on Debian: runc runs Machines (runsc, gVisor, runs those of the
# gvisor driver), busybox-static builds the demo
# and test images, docker-registry serves the registry tests, nftables checks the egress
# ruleset, btrfs-progs makes the loop-mounted btrfs of the disk quota tests, libc6-dev's
# static libc links berth-init (every Machine's PID 1) statically, postgresql gives the
# control plane's PostgreSQL tests initdb and pg_ctl (each test run starts a private
# cluster; createcluster.conf keeps the package from making and starting a system one).
# Does nothing when they are already present.
#
# --bench adds what only berth-bench uses: podman (a peer it measures) and
# fonts-dejavu-core (the text of its chart). The tests need neither.
set -euo pipefail

packages=()
if [ "${1:-}" = "--bench" ]; then
    command -v podman >/dev/null 2>&1 || packages+=(podman)
    [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || packages+=(fonts-dejavu-core)
fi
command -v runc >/dev/null 2>&1 || packages+=(runc)
command -v runsc >/dev/null 2>&1 || [ -x /usr/bin/runsc ] || packages+=(runsc)
dpkg -s busybox-static >/dev/null 2>&1 || packages+=(busybox-static)
[ -x /usr/bin/docker-registry ] || packages+=(docker-registry)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || packages+=(nftables)
command -v mkfs.btrfs >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.btrfs ] || packages+=(btrfs-progs)
dpkg -s libc6-dev >/dev/null 2>&1 || packages+=(libc6-dev)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
command -v cargo >/dev/null 2>&1 || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${packages[*]}; run as root to install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ " ${packages[*]} " == *" postgresql "* ]]; then
        mkdir -p /etc/postgresql-common
        echo 'create_main_cluster = false' >>/etc/postgresql-common/createcluster.conf
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
