#!/usr/bin/env bash
# Hyper-parameter sweep of FS-Merge on a config, selected by validation accuracy.
# Usage: scripts/sweep.sh CONFIG [extra --set args...]; prints one line per run:
#   val_mean test_mean joint  settings
# The originals are trained once (in runs/<name>/originals) and shared by every run.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/env.sh
config=$1; shift
extra=("$@")
name=$(basename "$config" .toml)
bin=target/release/fsmerge
models="runs/$name/originals"
$bin train "$config" --set "train.models_dir=\"$models\"" >/dev/null 2>&1 || true
for mode in local-then-global global local; do
  for lr in 1e-3 3e-3 1e-2; do
    for epochs in "40 20" "100 50"; do
      read -r local_epochs global_epochs <<<"$epochs"
      for targets in all own; do
        out="runs/sweep-$name/$mode-$lr-$local_epochs-$targets"
        $bin merge "$config" --out "$out" --set "train.models_dir=\"$models\"" --set 'baselines.methods=[]' \
          --set merge.mode=$mode --set merge.lr=$lr --set merge.epochs=$local_epochs --set merge.global_epochs=$global_epochs \
          --set merge.targets=$targets "${extra[@]}" >/dev/null 2>&1 || { echo "failed  $mode lr=$lr epochs=$epochs targets=$targets"; continue; }
        python3 - "$out/metrics.json" "$mode lr=$lr epochs=$local_epochs+$global_epochs targets=$targets" <<'PY'
import json, sys
r = [x for x in json.load(open(sys.argv[1]))["results"] if x["method"] == "fs-merge"][0]
print(f'{100*r["val_mean_task_acc"]:.2f} {100*r["mean_task_acc"]:.2f} {100*r["joint_acc"]:.2f}  {sys.argv[2]}', flush=True)
PY
      done
    done
  done
done
