#!/usr/bin/env bash
# Runs one fsmerge job inside a Slurm allocation: the coordinator on the first host (this batch
# shell), one worker per task through srun (rank = SLURM_PROCID, GPU = SLURM_LOCALID). A requeued
# job finds its work directory and continues with --resume; the warning signal
# (#SBATCH --signal=B:USR1@120) stops the job cleanly and requeues it.
#
# Backend: BACKEND=nccl|quic if set; else nccl when the job was given GPUs (sbatch
# --gpus-per-node=N sets SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES), QUIC on CPUs otherwise.
#
# Sourced by the sbatch templates beside this file; needs CONFIG (and optionally OUT, SETS,
# BACKEND, FSMERGE_BIN).
set -euo pipefail
: "${CONFIG:?set CONFIG=path/to/job.toml}"
OUT=${OUT:-runs/$(basename "$CONFIG" .toml)}
SETS=${SETS:-}
BIN=${FSMERGE_BIN:-target/release/fsmerge}

if [[ -z "${BACKEND:-}" ]]; then
    BACKEND=quic
    # An empty, "NoDevFiles" (older Slurm) or -1 CUDA_VISIBLE_DEVICES means no GPU.
    gpus_visible=${CUDA_VISIBLE_DEVICES:-}
    if [[ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]] ||
        [[ -n "$gpus_visible" && "$gpus_visible" != NoDevFiles && "$gpus_visible" != -1 ]]; then
        BACKEND=nccl
    fi
fi
case "$BACKEND" in nccl | quic) ;; *) echo "fsmerge: BACKEND must be nccl or quic, not '$BACKEND'" >&2; exit 2 ;; esac
echo "fsmerge: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}), ${SLURM_NTASKS:-?} worker(s) on ${SLURM_JOB_NODELIST:-?}, backend $BACKEND"

source deploy/env.sh
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One job token for the coordinator and every worker (they also read it from the rendezvous file).
FSMERGE_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export FSMERGE_TOKEN

# The coordinator writes the manifest as soon as it starts: any earlier attempt that got that far
# is resumed, its finished phases restored instead of retrained.
resume=()
if [[ -f "$OUT.work/manifest.json" ]]; then
    echo "fsmerge: found $OUT.work/manifest.json, resuming"
    resume=(--resume)
fi
# A rendezvous file of an earlier attempt names a dead coordinator.
rm -f "$OUT.work/rendezvous.json"

# Trap before starting anything, so an early warning signal is not lost.
coordinator=
workers=
requeue() {
    echo "fsmerge: time limit near; stopping and requeueing (finished phases are checkpointed)"
    # shellcheck disable=SC2086 # unset pids expand to nothing
    kill $coordinator $workers 2>/dev/null || true
    wait || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1

read -r -a extra <<< "$SETS"
"$BIN" coordinator "$CONFIG" --out "$OUT" "${resume[@]}" \
    --set cluster.backend="\"$BACKEND\"" \
    --set cluster.worker_threads="${SLURM_CPUS_PER_TASK:-4}" \
    "${extra[@]}" &
coordinator=$!

srun --kill-on-bad-exit=1 "$BIN" worker --rendezvous "$OUT.work/rendezvous.json" &
workers=$!

# Whichever ends first: the coordinator (its status is the job's), or srun. Failed workers are
# named by the coordinator within its peer timeout (8 s); but one still waiting for workers that
# never registered would wait for its register timeout (300 s), so it is stopped after 15 s.
# `wait` returns early when a trapped signal arrives, so the trap runs promptly.
status=0
wait -n || status=$?
if kill -0 "$coordinator" 2>/dev/null; then
    if [[ $status -ne 0 ]]; then
        for _ in $(seq 15); do
            kill -0 "$coordinator" 2>/dev/null || break
            sleep 1 & wait $!
        done
        if kill -0 "$coordinator" 2>/dev/null; then
            echo "fsmerge: workers failed (srun exit $status); stopping the coordinator" >&2
            kill "$coordinator" 2>/dev/null || true
        fi
        wait "$coordinator" || true
        exit "$status"
    fi
    wait "$coordinator" || status=$?
else
    status=0
    wait "$coordinator" || status=$?
    if [[ $status -ne 0 ]]; then
        kill "$workers" 2>/dev/null || true
    fi
    wait "$workers" || true
fi
exit "$status"
