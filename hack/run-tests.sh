#!/usr/bin/env bash
# Runs every test of the workspace (benchmarks are `make bench`, not tests) and ends with one summary line over all test binaries
# ("tests: N passed, N failed"), since cargo prints one result line per binary.
set -uo pipefail
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --lib --bins --tests --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
