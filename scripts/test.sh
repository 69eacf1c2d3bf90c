#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh) and runs every test of the workspace (release profile,
# the one setup builds), then the Slurm templates under a real Slurm (scripts/slurm-test.sh;
# skipped with one line where Slurm cannot run). `.ci/run` calls exactly this after fmt and
# clippy. Ends with one line counting all tests, the Slurm test as one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/env.sh
log=$(mktemp)
set +e
# --no-fail-fast: every test binary runs, so the count covers them all.
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# After the cargo tests, which it needs built; its failure fails this script too.
bash scripts/slurm-test.sh 2>&1 | tee -a "$log"
slurm_status=${PIPESTATUS[0]}
set -e
[ "$slurm_status" = 0 ] || status=1
awk -v slurm="$slurm_status" '
  /^test result:/ { passed += $4; failed += $6 }
  /^slurm test skipped:/ { skipped = 1 }
  END {
    if (skipped) extra = ", 1 skipped"; else if (slurm == 0) passed++; else failed++
    printf "tests: %d passed, %d failed%s\n", passed, failed, extra
  }' "$log"
rm -f "$log"
exit "$status"
