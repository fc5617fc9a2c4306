#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs what it needs, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-test-deps
export TETHER_PYTHON="$PWD/target/pyenv/bin/python"
cargo test "$@"
