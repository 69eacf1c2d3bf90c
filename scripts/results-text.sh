#!/usr/bin/env bash
# The text results of the README and the closing notes (issues 4 and 16): two tiny HF models
# of one family (`bert` or `llama`, the first argument) on the text tasks (spam vs ham mails,
# female vs male names), seeds 0, 1, 2, FS-Merge local-then-global (the config) and global
# (40 epochs), then the mean ± std tables. `MODES` picks the modes (default both); extra
# arguments go to every merge.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
family=${1:?usage: scripts/results-text.sh bert|llama [--set key=value ...]}
shift
bin=target/release/fsmerge
modes=${MODES:-local-then-global global}
for seed in 0 1 2; do
  for mode in $modes; do
    $bin merge "configs/spam-names-$family.toml" --seed "$seed" --out "runs/results/$family-$mode-seed$seed" \
      --set "train.models_dir=\"runs/results/$family-originals-seed$seed\"" \
      --set "merge.mode=\"$mode\"" --set merge.epochs=$([ $mode = global ] && echo 40 || echo 20) \
      "$@" >/dev/null
  done
done
for mode in $modes; do
  echo "## $mode"
  $bin summarize runs/results/$family-$mode-seed{0,1,2}
done
