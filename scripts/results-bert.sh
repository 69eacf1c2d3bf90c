#!/usr/bin/env bash
# The BERT results of the README and the closing note (issue 4): two tiny HF BERTs on the text
# tasks (spam vs ham mails, female vs male names), seeds 0, 1, 2, FS-Merge local-then-global
# (the config) and global (40 epochs), then the mean ± std tables. Extra arguments go to every
# merge.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
bin=target/release/fsmerge
for seed in 0 1 2; do
  for mode in local-then-global global; do
    $bin merge configs/spam-names-bert.toml --seed "$seed" --out "runs/results/bert-$mode-seed$seed" \
      --set "train.models_dir=\"runs/results/bert-originals-seed$seed\"" \
      --set "merge.mode=\"$mode\"" --set merge.epochs=$([ $mode = global ] && echo 40 || echo 20) \
      "$@" >/dev/null
  done
done
for mode in local-then-global global; do
  echo "## $mode"
  $bin summarize runs/results/bert-$mode-seed{0,1,2}
done
