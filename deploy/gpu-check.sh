#!/usr/bin/env bash
# GPU check: on a machine with a GPU and torch 2.11.0 (the image's, or .venv's), run single-GPU
# merges with the NCCL backend (one rank; an MLP, a ViT, and a BERT when the text data is there),
# check that CUDA and NCCL were really used, and print step times. Needs a built `fsmerge` (pass
# its path, default target/release/fsmerge) and the digits data (data/digits.csv.gz, made by
# deploy/setup.sh); the BERT merge runs when data/spam-assassin, data/names and the vocabulary are
# there too. Then the scale case when `transformers` is importable: 8 ViT-B/16-shaped models
# (tests/fixtures/make_scale_models.py, SCALE_INPUTS merge images per task, default 64) merged
# on the one GPU in bf16 and in fp32 (SCALE_PRECISIONS), local then global for one epoch each,
# with its phase times and peak memory.
#
#   deploy/gpu-check.sh [path/to/fsmerge]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fsmerge}
PY=${PYTHON:-python3}
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; PY=python3; fi

torch_lib=$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nccl_lib=$("$PY" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$torch_lib${nccl_lib:+:$nccl_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

"$BIN" doctor | tee /tmp/fsmerge-doctor.txt
grep -q '^CUDA: [1-9]' /tmp/fsmerge-doctor.txt || { echo "FAIL: libtorch sees no CUDA device"; exit 1; }
grep -q '^NCCL: found' /tmp/fsmerge-doctor.txt || { echo "FAIL: NCCL not loadable"; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
check() { # metrics.json [min accuracy]: one worker, on CUDA, and an accurate merge
"$PY" - "$1" "${2:-0.8}" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
w = m["workers"]
assert len(w) == 1, w
dev = w[0]["device"]
print(f"worker device: {dev}")
if not dev.startswith("cuda"):
    sys.exit("FAIL: the worker trained on " + dev)
for phase, secs in w[0]["phase_seconds"].items():
    steps = w[0]["phase_steps"].get(phase, 0)
    print(f"{phase}: {steps} steps in {secs:.2f} s = {1000 * secs / max(steps, 1):.2f} ms/step")
fs = [r for r in m["results"] if r["method"] == "fs-merge"][0]
print(f"fs-merge mean task accuracy {100 * fs['mean_task_acc']:.2f}%")
if fs["mean_task_acc"] < float(sys.argv[2]):
    sys.exit("FAIL: merged model accuracy too low")
print("OK: single-GPU merge with the NCCL backend")
PYEOF
}
# An MLP and a ViT merge (HF ViTs on the digits), each one NCCL worker on the GPU.
for config in configs/digits-mlp.toml configs/digits-vit.toml; do
  name=$(basename "$config" .toml)
  RUST_LOG=${RUST_LOG:-info} "$BIN" merge "$config" --out "$out/$name" \
      --set "train.models_dir=\"$out/models-$name\"" \
      --set 'cluster.backend="nccl"' \
      --set 'baselines.methods=[]' \
      --set merge.epochs="${EPOCHS:-30}" --set merge.global_epochs="${EPOCHS:-30}"
  check "$out/$name/metrics.json"
done
# A BERT merge on the text tasks (the CI test's small setting), one NCCL worker on the GPU.
if [[ -d data/spam-assassin && -d data/names && -f data/all-MiniLM-L6-v2/vocab.txt ]]; then
  RUST_LOG=${RUST_LOG:-info} "$BIN" merge configs/spam-names-bert.toml --out "$out/bert" \
      --set "train.models_dir=\"$out/models-bert\"" \
      --set 'cluster.backend="nccl"' \
      --set 'baselines.methods=[]' \
      --set data.max_tokens=32 --set train.epochs=2 --set merge.mode='"global"' \
      --set merge.epochs="${EPOCHS:-12}" --set merge.lr=1e-2
  check "$out/bert/metrics.json" 0.75
else
  echo "SKIP: BERT merge (no text data; deploy/setup.sh fetches it)"
fi
# The scale case: 8 ViT-B/16s (86 M parameters each) on one GPU.
if "$PY" -c 'import transformers' 2>/dev/null; then
  inputs=${SCALE_INPUTS:-64}
  "$PY" tests/fixtures/make_scale_models.py "$out/scale" vit 8 "$inputs" | tail -1
  {
    echo 'name = "scale-vit"'
    for k in 0 1 2 3 4 5 6 7; do
      echo "[[models]]"
      echo "path = \"$out/scale/models/m$k\""
      echo "merge_data = { format = \"imagefolder\", path = \"$out/scale/data/m$k/merge\" }"
    done
    echo "[merge]"
    echo "mode = \"local-then-global\""
    echo "epochs = 1"
    echo "global_epochs = 1"
    echo "batch_size = 32"
    echo "n_originals = $inputs"
    echo "n_augmented = 0"
    echo "[baselines]"
    echo "methods = []"
  } > "$out/scale.toml"
  # bf16 first (the issue's case), then fp32 beside it: SCALE_PRECISIONS picks.
  for prec in ${SCALE_PRECISIONS:-bf16 fp32}; do
    /usr/bin/time -v "$BIN" merge "$out/scale.toml" --out "$out/scale-$prec" \
        --set 'cluster.backend="nccl"' --set "merge.precision=\"$prec\"" \
        2> "$out/scale-$prec.log" || { tail -30 "$out/scale-$prec.log"; exit 1; }
    grep -E 'Maximum resident|Elapsed' "$out/scale-$prec.log"
    "$PY" - "$out/scale-$prec/metrics.json" "$prec" <<'PYEOF'
import json, sys
w = json.load(open(sys.argv[1]))["workers"][0]
p = sys.argv[2]
print(f"scale {p}: device {w['device']}, load {w.get('load_seconds', 0):.1f} s, "
      f"teacher features {w.get('features_seconds', 0):.1f} s, peak RSS {w['peak_rss_mib']:.0f} MiB, "
      f"originals {w['weight_bytes'] / 2**30:.2f} GiB")
for phase, secs in w["phase_seconds"].items():
    steps = w["phase_steps"].get(phase, 0)
    print(f"scale {p} {phase}: {steps} steps, {1000 * secs / max(steps, 1):.0f} ms/step")
PYEOF
  done
else
  echo "SKIP: the ViT-B/16 x 8 scale case (transformers not importable)"
fi
