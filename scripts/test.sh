#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh) and runs every test of the workspace (release profile,
# the one setup builds). `.ci/run` calls exactly this after fmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/env.sh
cargo test --release --workspace
