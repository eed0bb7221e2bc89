#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the root integration tests
# against real runc, overlayfs and namespaces. Fails if the tests leave mounts, runc
# containers, temp directories, links, nftables tables, volume mounts or loop devices
# behind.
set -euo pipefail
export LC_ALL=C
# Incremental caches only help rebuilds; a test run is one clean build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cd "$(dirname "$0")/.."
scripts/install-deps.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "the integration tests need root (runc, overlayfs, namespaces)" >&2
    exit 1
fi

leftovers() {
    # Mounts, runc containers and temp dirs that Berth's tests could create.
    grep -E ' (overlay|nsfs) ' /proc/self/mountinfo | grep -E 'berth|/tmp/' | awk '{print $5}' | sort || true
    # Volumes: their filesystems and the loop devices under them.
    grep -E ' ext4 ' /proc/self/mountinfo | grep -E 'berth-volume-fs' | awk '{print $5}' | sort || true
    losetup -l -n -O BACK-FILE 2>/dev/null | grep -E '/volumes/[^/]+/(disk|snapshots/).*\.img' | sort || true
    runc list -q 2>/dev/null | sort || true
    find "${TMPDIR:-/tmp}" -maxdepth 1 -mindepth 1 \( -name '.tmp*' -o -name 'berth*' \) 2>/dev/null | sort || true
    # Worker bridges (bz…) and Machine veths (bv…).
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | grep -E '^(bz|bv)[0-9a-f]{12}' | sort || true
    # The bridges' nftables filters.
    nft list tables 2>/dev/null | grep -E ' berth_' | sort || true
}
before=$(mktemp)
after=$(mktemp)
trap 'rm -f "$before" "$after"' EXIT
leftovers >"$before"

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets --all-features -- -D warnings
cargo test --locked --workspace --all-features --no-fail-fast
# The control plane's tests and the end-to-end suite again, on a private PostgreSQL
# instead of SQLite: the binaries built above, run as cargo runs them (from their
# crate's directory), so nothing is built twice. The replica tests use PostgreSQL
# whatever the setting, and ran above.
postgres_failed=0
postgres_ran=0
while read -r crate binary; do
    echo "     Running $binary on PostgreSQL"
    (cd "crates/$crate" && BERTH_TEST_DATABASE=postgres "$binary") || postgres_failed=1
    postgres_ran=$((postgres_ran + 1))
done < <(cargo test --locked --workspace --all-features --no-run --message-format=json 2>/dev/null |
    grep -E '"package_id":"[^"]*/crates/(berth|berth-control)#' |
    grep -vE '"name":"(replicas|replica_ops|store_postgres)"' |
    sed -nE 's|.*"package_id":"[^"]*/crates/([a-z-]+)#.*"executable":"([^"]+/deps/[^"]+)".*|\1 \2|p')
# A broken listing would otherwise run nothing and pass.
if [ "$postgres_ran" -lt 30 ]; then
    echo "only $postgres_ran test binaries were found for the PostgreSQL pass" >&2
    exit 1
fi
# Each test binary's private PostgreSQL is stopped and deleted by a watcher once the
# binary has exited; give the last watchers time to finish (they poll every 0.2 s).
for _ in $(seq 1 150); do
    pgrep -f 'berth-pg-.*postmaster[.]pid' >/dev/null || break
    sleep 0.2
done

if [ "$postgres_failed" -ne 0 ]; then
    echo "tests failed on PostgreSQL" >&2
    exit 1
fi

leftovers >"$after"
if new=$(comm -13 "$before" "$after") && [ -n "$new" ]; then
    echo "the tests left these behind:" >&2
    echo "$new" >&2
    exit 1
fi
echo "no mounts, runc containers or temp directories left behind"
