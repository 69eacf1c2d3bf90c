#!/usr/bin/env bash
# Runs one fsmerge job inside a Slurm allocation: the coordinator on the first host (this batch
# shell), one worker per task through srun (rank = SLURM_PROCID, GPU = SLURM_LOCALID), the NCCL
# backend. A requeued job finds its work directory and continues with --resume; the warning
# signal (#SBATCH --signal=B:USR1@120) stops the job cleanly and requeues it.
#
# Sourced by the sbatch templates beside this file; needs CONFIG (and optionally OUT, SETS).
set -euo pipefail
: "${CONFIG:?set CONFIG=path/to/job.toml}"
OUT=${OUT:-runs/$(basename "$CONFIG" .toml)}
SETS=${SETS:-}
BIN=${FSMERGE_BIN:-target/release/fsmerge}

source deploy/env.sh
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One job token for the coordinator and every worker (they also read it from the rendezvous file).
FSMERGE_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export FSMERGE_TOKEN

resume=()
if [[ -f "$OUT.work/manifest.json" ]]; then
    echo "fsmerge: found $OUT.work/manifest.json, resuming"
    resume=(--resume)
fi
# A rendezvous file of an earlier attempt names a dead coordinator.
rm -f "$OUT.work/rendezvous.json"

read -r -a extra <<< "$SETS"
"$BIN" coordinator "$CONFIG" --out "$OUT" "${resume[@]}" \
    --set cluster.backend='"nccl"' \
    --set cluster.worker_threads="${SLURM_CPUS_PER_TASK:-4}" \
    "${extra[@]}" &
coordinator=$!

srun --kill-on-bad-exit=1 "$BIN" worker --rendezvous "$OUT.work/rendezvous.json" &
workers=$!

requeue() {
    echo "fsmerge: time limit near; stopping and requeueing (finished phases are checkpointed)"
    kill "$coordinator" "$workers" 2>/dev/null || true
    wait || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1

# `wait` returns early when a trapped signal arrives, so the trap runs promptly.
status=0
wait "$coordinator" || status=$?
if [[ $status -ne 0 ]]; then
    kill "$workers" 2>/dev/null || true
fi
wait "$workers" || true
exit "$status"
