#!/usr/bin/env bash
# The ViT results of the README and the closing note (issue 4): two tiny ViTs on the
# Fashion-MNIST halves at N = 100 + 800 and N = 16 + 800, and five ViTs of two classes each,
# seed 0 (one seed: a ViT job takes minutes on 2 cores). Extra arguments go to every merge.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
bin=target/release/fsmerge
run() { # name config extra...
  local name=$1 config=$2; shift 2
  $bin merge "$config" --out "runs/results/$name" \
    --set "train.models_dir=\"runs/results/$(basename "$config" .toml)-originals\"" "$@" >/dev/null
  echo "## $name"
  cat "runs/results/$name/results.md"
}
run vit-2tasks-n100 configs/fmnist-vit.toml "$@"
run vit-2tasks-n16 configs/fmnist-vit.toml --set merge.n_originals=16 "$@"
run vit-5tasks-n100 configs/fmnist-vit-5tasks.toml "$@"
