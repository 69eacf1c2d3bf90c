#!/usr/bin/env bash
# The Slurm templates under a real Slurm on this one machine: a private cluster of two fake nodes
# (n1, n2, one CPU each, distinct slurmd ports) with its own munged, all started by hand (no
# systemd) in a temporary folder and stopped on exit. Checks, on the digits MLP split in two
# stages, one worker per node, QUIC backend:
#   (a) deploy/slurm/multi-node.sbatch gives what `fsmerge merge` gives for the same job
#       (metrics rows' accuracies and the merged tensors, scripts/compare-runs.py);
#   (b) the same job, sent the time-limit warning (USR1) during its global phase, requeues
#       itself, resumes from its work directory without retraining the finished phases, and
#       ends with the same result.
# Prints "slurm test skipped: <reason>" and exits 0 when Slurm cannot be set up here (no root or
# sudo, apt fails, a daemon does not start); any failure of the check itself exits 1.
# FSMERGE_BIN picks the binary (default target/release/fsmerge); SLURM_TEST_KEEP=1 keeps the
# temporary folder (logs, outputs) for a look after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
export FSMERGE_BIN=${FSMERGE_BIN:-target/release/fsmerge}

# A global phase of several seconds on 2 cores, so that the warning reliably lands inside it.
CONFIG=configs/digits-mlp.toml
SETS_COMMON="--set merge.epochs=20 --set merge.global_epochs=40 --set cluster.stages=2 --set cluster.worker_threads=1"

say() { echo "[slurm-test] $*" >&2; }
skipped=
skip() {
    skipped=1
    echo "slurm test skipped: $*"
    exit 0
}
fail() {
    echo "slurm test FAILED: $*" >&2
    exit 1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
last_line() { cat "$@" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -n1; }

[ -x "$FSMERGE_BIN" ] || fail "no fsmerge binary at $FSMERGE_BIN (build it, or set FSMERGE_BIN)"
if [ "$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then
    skip "needs root or passwordless sudo to run the Slurm daemons"
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
    ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge (apt)"
    as_root apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 ||
        skip "apt-get install slurm-wlm munge failed"
fi
source deploy/env.sh

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fsmerge-slurm.XXXXXX")
chmod 755 "$tmp" # the munge user must reach its socket folder inside
export SLURM_CONF=$tmp/slurm.conf

stop_pidfile() { # stop the daemon of one pid file (ours only, never by name), kill it after 10 s
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    as_root kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do as_root kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    as_root kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
    local status=$?
    # Jobs' processes belong to slurmstepd, not slurmd: cancel them before the daemons go.
    if [ -f "$tmp/slurmctld.pid" ]; then
        scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    for f in "$tmp"/slurmd-n1.pid "$tmp"/slurmd-n2.pid "$tmp"/slurmctld.pid "$tmp"/munge/munged.pid; do
        stop_pidfile "$f"
    done
    if [ -n "${SLURM_TEST_KEEP:-}" ]; then echo "kept $tmp" >&2; else as_root rm -rf "$tmp"; fi
    [ -n "$skipped" ] || echo "slurm test: $((SECONDS - started)) s"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM HUP
trap 'exit 130' INT

# Ports free right now for slurmctld and the two slurmds; a random first job id, since the
# coordinator's port is derived from the job id (15000 + its last four digits).
read -r ctld_port n1_port n2_port < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
first_job=$((1000 + RANDOM % 9000))
host=$(hostname -s)

# A private munged with its own key, so nothing under /etc or /run is touched.
mkdir -p "$tmp/munge"
as_root chown munge:munge "$tmp/munge"
as_root runuser -u munge -- mungekey --create --keyfile="$tmp/munge/munge.key" >/dev/null 2>&1 ||
    skip "mungekey failed"
as_root runuser -u munge -- munged --socket="$tmp/munge/munge.socket" --key-file="$tmp/munge/munge.key" \
    --pid-file="$tmp/munge/munged.pid" --log-file="$tmp/munge/munged.log" \
    --seed-file="$tmp/munge/munged.seed" 2>"$tmp/munged.err" ||
    skip "munged does not start: $(last_line "$tmp/munged.err" "$tmp/munge/munged.log")"

# Without cgroups: linuxproc tracking, no task plugin, no accounting.
mkdir -p "$tmp/state" "$tmp/slurmd-n1" "$tmp/slurmd-n2"
cat >"$SLURM_CONF" <<EOF
ClusterName=fsmergeci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$tmp/munge/munge.socket
StateSaveLocation=$tmp/state
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdSpoolDir=$tmp/slurmd-%n
SlurmdPidFile=$tmp/slurmd-%n.pid
SlurmdLogFile=$tmp/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
FirstJobId=$first_job
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n1_port CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n2_port CPUs=1 State=UNKNOWN
PartitionName=ci Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
as_root slurmctld -f "$SLURM_CONF" 2>"$tmp/slurmctld.err" ||
    skip "slurmctld does not start: $(last_line "$tmp/slurmctld.err" "$tmp/slurmctld.log")"
for n in n1 n2; do
    as_root slurmd -f "$SLURM_CONF" -N "$n" 2>"$tmp/slurmd-$n.err" ||
        skip "slurmd -N $n does not start: $(last_line "$tmp/slurmd-$n.err" "$tmp/slurmd-$n.log")"
done
for _ in $(seq 150); do
    [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')" = "n1 idle n2 idle " ] && break
    sleep 0.2
done
[ "$(sinfo -h -N -o '%t' 2>/dev/null | sort -u)" = idle ] ||
    skip "nodes not idle after 30 s: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')"
say "Slurm up in $((SECONDS - started)) s: nodes n1, n2 idle"

# The originals, trained once and shared by every run; the reference: the same job in one process.
sets="$SETS_COMMON --set train.models_dir=\"$tmp/models\""
read -r -a sets_arr <<<"$sets"
say "reference: fsmerge merge"
RUST_LOG=warn timeout 300 "$FSMERGE_BIN" merge "$CONFIG" --out "$tmp/ref" "${sets_arr[@]}" >"$tmp/ref.log" 2>&1 ||
    fail "fsmerge merge failed: $(tail -n5 "$tmp/ref.log")"

# Two fake nodes, one task and one CPU each; no GPUs, so launch.sh picks QUIC.
submit=(sbatch --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --time=10)
export CONFIG SETS="$sets"
unset BACKEND # launch.sh must pick QUIC by itself
show_log() { echo "--- $1" >&2; tail -n 30 "$1" >&2 || true; }
state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
# Poll rather than `sbatch --wait`, which notices the end up to ~30 s late.
wait_job() { # label, job, its log, seconds
    local label=$1
    shift
    local deadline=$((SECONDS + $3)) s
    while s=$(state "$1"); [ "$s" != COMPLETED ]; do
        case "$s" in
        PENDING | RUNNING | CONFIGURING | COMPLETING | REQUEUED) ;;
        *) show_log "$2"; fail "$label job $1 ended ${s:-unknown}" ;;
        esac
        [ $SECONDS -lt $deadline ] || { show_log "$2"; fail "$label job $1 not done after $3 s (state $s)"; }
        sleep 0.3
    done
}

say "(a) multi-node.sbatch, 2 nodes x 1 task"
job=$(OUT=$tmp/a "${submit[@]}" --parsable --output="$tmp/a.out" deploy/slurm/multi-node.sbatch)
wait_job "(a)" "${job%%;*}" "$tmp/a.out" 300
grep -q 'backend quic' "$tmp/a.out" || { show_log "$tmp/a.out"; fail "(a) did not run the QUIC backend"; }
python scripts/compare-runs.py "$tmp/ref" "$tmp/a" || fail "(a) Slurm job and fsmerge merge differ"
say "(a) passed: same rows and tensors as fsmerge merge"

say "(b) the same job, warned (USR1) during its global phase"
job=$(OUT=$tmp/b "${submit[@]}" --parsable --output="$tmp/b.out" deploy/slurm/multi-node.sbatch)
job=${job%%;*}
# Both stages' local phases listed as finished in the manifest: the global phase is running.
deadline=$((SECONDS + 120))
until [ "$(grep -c '"phase": "local"' "$tmp/b.work/manifest.json" 2>/dev/null)" = 2 ]; do
    [ $SECONDS -lt $deadline ] || { show_log "$tmp/b.out"; fail "(b) local phases not finished after 120 s"; }
    case "$(state "$job")" in
    PENDING | RUNNING | CONFIGURING) ;;
    *) show_log "$tmp/b.out"; fail "(b) job $job ended ($(state "$job")) before it could be warned" ;;
    esac
    sleep 0.1
done
grep -q '"phase": "global"' "$tmp/b.work/manifest.json" && fail "(b) global phase already finished; warn it earlier"
scancel --signal=USR1 --batch "$job"
# The requeued job waits ~120 s (BeginTime) before it is eligible again: start it now, once its
# first run has left both nodes and a second has passed (slurmd refuses a credential of the
# same job issued within the second of its revocation: "Job credential revoked").
deadline=$((SECONDS + 60))
until scontrol show job "$job" | grep -q 'Restarts=1' && [ "$(state "$job")" = PENDING ] &&
    [ "$(sinfo -h -N -o '%t' | sort -u)" = idle ]; do
    [ $SECONDS -lt $deadline ] || { show_log "$tmp/b.out"; fail "(b) not requeued within 60 s of USR1 (state $(state "$job"))"; }
    sleep 0.2
done
sleep 1.1
scontrol update JobId="$job" StartTime=now
wait_job "(b)" "$job" "$tmp/b.out" 300
# Evidence: the warning, the requeue, the resume, and local phases restored (not retrained).
for want in 'requeueing' '(restart 1)' 'resuming' "phase \`local\` restored from its checkpoint"; do
    grep -qF "$want" "$tmp/b.out" || { show_log "$tmp/b.out"; fail "(b) no '$want' in the job's log"; }
done
grep -E 'fsmerge: (job|found|time limit)|restored from its checkpoint' "$tmp/b.out" |
    sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/[slurm-test]   /' >&2
python scripts/compare-runs.py "$tmp/ref" "$tmp/b" || fail "(b) requeued job and fsmerge merge differ"
say "(b) passed: requeued once, resumed, same rows and tensors as fsmerge merge"
echo "slurm test: (a) and (b) passed"
