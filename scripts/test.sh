#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh) and runs every test of the workspace (release profile,
# the one setup builds). `.ci/run` calls exactly this after fmt and clippy. Ends with one line
# counting all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/env.sh
log=$(mktemp)
set +e
cargo test --release --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
rm -f "$log"
exit "$status"
