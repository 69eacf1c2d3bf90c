#!/usr/bin/env bash
# Fuzz the readers of untrusted input (wire messages, safetensors, HF index and config.json,
# the TOML job config) with N mutated inputs per target:
#   bash scripts/fuzz.sh 1000000            # every target
#   bash scripts/fuzz.sh 100000 wire toml   # some
# Panicking inputs are saved in fuzz-crashes/; the exit status is 1 if there were any.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
cargo build --release -q -p fsmerge-tests --bin fuzz
exec target/release/fuzz "$@"
