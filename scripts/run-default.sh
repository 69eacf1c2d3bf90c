#!/usr/bin/env bash
# Sets everything up (deploy/setup.sh) and runs the default job: two MLPs on the halves of
# Fashion-MNIST, trained if missing, merged with FS-Merge beside every baseline. Results go to
# runs/fmnist-mlp/ (results.md, metrics.json, merged model). Extra arguments go to `merge`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/env.sh
exec target/release/fsmerge merge configs/fmnist-mlp.toml "$@"
