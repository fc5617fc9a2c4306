#!/usr/bin/env bash
# The demo from a fresh machine: installs what it needs, builds the host, the device
# simulator and the demo agent, and runs `tether demo`. Ctrl-C ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p tether-host -p device-sim
cargo build --profile guest --target wasm32-wasip2 -p azure-demo
exec target/release/tether demo --state-dir tether-data "$@"
