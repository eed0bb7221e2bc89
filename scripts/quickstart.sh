#!/usr/bin/env bash
# Quick start: install what is missing, build, and run the platform with a demo Machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p berth
exec target/release/berth up --demo "$@"
