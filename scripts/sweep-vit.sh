#!/usr/bin/env bash
# The ViT defaults' sweep (README "Results"): FS-Merge only, seed 0, on the originals of
# configs/fmnist-vit.toml (trained by the first merge if missing); prints each variant's FS-Merge row
# (validation mean task accuracy is the column before the seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
bin=target/release/fsmerge
models='train.models_dir="runs/fmnist-vit/originals"'
while read -r name sets; do
  args=()
  for s in $sets; do args+=(--set "$s"); done
  $bin merge configs/fmnist-vit.toml --out "runs/sweep-vit/$name" --set 'baselines.methods=[]' \
    --set "$models" "${args[@]}" >/dev/null
  echo "$name: $(grep '^| fs-merge |' "runs/sweep-vit/$name/results.md")"
done <<'VARIANTS'
ltg1 merge.lr=1e-3
ltg3 merge.lr=3e-3
glob1 merge.mode="global" merge.epochs=100 merge.lr=1e-3
glob3 merge.mode="global" merge.epochs=100 merge.lr=3e-3
loc3 merge.mode="local" merge.epochs=100 merge.lr=3e-3
VARIANTS
