#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs what it needs, then runs every test.
# Every test binary runs even when an earlier one fails (--no-fail-fast: one failure must
# not hide the results of the others), the exit status is still non-zero, and the output
# ends with the list of what failed. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-test-deps
export TETHER_PYTHON="$PWD/target/pyenv/bin/python"

# A copy of the output to list the failures from at the end; per run, so that two runs at
# once do not share it.
log="$(mktemp "${TMPDIR:-/tmp}/tether-test.XXXXXX")"
trap 'rm -f "$log"' EXIT

# Agent crates' own tests (examples/greenhouse/tests, on tether-testkit) run `tether` and
# `device-sim` as an author's would: built first, with the features `cargo test` builds
# with (`--tests`), so that nothing is compiled twice.
export TETHER_BIN="$PWD/target/debug/tether" DEVICE_SIM="$PWD/target/debug/device-sim"
status=0
{ cargo build --tests --bins && cargo test --no-fail-fast "$@"; } 2>&1 | tee "$log" || status=${PIPESTATUS[0]}

if [ "$status" -ne 0 ]; then
  echo
  echo "==================== FAILED (cargo test exit status $status) ===================="
  # libtest prints "test NAME ... FAILED" per failed test; cargo names the binary it is
  # running ("Running tests/x.rs (target/...)", "Doc-tests crate") and, for each binary
  # that failed (crashed or timed out ones too), how to rerun it.
  awk '
    /^ *Running / { sub(/^ *Running /, ""); binary = $0; next }
    /^ *Doc-tests / { sub(/^ *Doc-tests /, ""); binary = "doc-tests " $0; next }
    /^test .* \.\.\. FAILED$/ { name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED$/, "", name); printf "  %s: %s\n", binary, name; next }
  ' "$log"
  grep -E '^error: (test|doctest) failed, to rerun pass' "$log" | sed -E 's/^error: (test|doctest) failed, to rerun pass `(.*)`$/  rerun: cargo test \2/' || true
  if ! grep -qE '^test result: |^error: (test|doctest) failed' "$log"; then
    echo "  no test ran: the build failed (see the errors above)"
  fi
fi
exit "$status"
