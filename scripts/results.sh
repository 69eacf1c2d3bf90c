#!/usr/bin/env bash
# The results of the closing note and the README: the 2-task Fashion-MNIST job at N = 100 + 800
# and N = 16 + 800, and the 5-task job, each over seeds 0, 1, 2 (a seed changes the originals,
# the merge data and the M/U init), summarized as mean ± std. Extra arguments go to every merge.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
bin=target/release/fsmerge
run() { # name config extra...
  local name=$1 config=$2; shift 2
  for seed in 0 1 2; do
    $bin merge "$config" --seed $seed --out "runs/results/$name-seed$seed" \
      --set "train.models_dir=\"runs/results/$(basename "$config" .toml)-seed$seed-originals\"" "$@" >/dev/null
  done
  echo "## $name"
  $bin summarize runs/results/$name-seed{0,1,2}
}
run fmnist-2tasks-n100 configs/fmnist-mlp.toml "$@"
run fmnist-2tasks-n16 configs/fmnist-mlp.toml --set merge.n_originals=16 "$@"
run fmnist-5tasks-n100 configs/fmnist-mlp-5tasks.toml "$@"
