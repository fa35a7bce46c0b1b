#!/bin/bash
# Train modaseg on N nodes x G GPUs (or CPU nodes), requeued and resumed after preemption.
#
#   sbatch [sbatch options] slurm/train.sh CONFIG.yaml [key=value ...]
#   sbatch --nodes=4 slurm/train.sh configs/modanet.yaml optim.lr=3e-4
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=4 slurm/train.sh configs/tiny.yaml   # CPU nodes
#
# Submit from the repository root (or set MODASEG_ROOT). Environment variables, options and the
# preemption protocol: slurm/README.md.
#SBATCH --job-name=modaseg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
# CPUs: GPUs x (data.workers + 1 training process) = 8 x (8 + 1) for configs/modanet.yaml
#SBATCH --cpus-per-task=72
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

log() { echo "[modaseg $(date +%T) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }
die() {
    log "ERROR: $*" >&2
    exit 2
}

# USR1 (--signal=B:USR1@300, or `scancel --signal=USR1 --batch JOBID`) reaches only this shell.
# Forward SIGTERM to the job steps (every process of srun's step: launchers and training processes).
# The training processes agree at the next optimizer update, save a checkpoint and exit 75;
# torchrun's agent forwards SIGTERM to them as well and gives them 30 s before SIGKILL.
# (SIGUSR1 is not forwarded as such: the agent has no handler for it and would die at once.)
PREEMPTED=0
on_usr1() {
    PREEMPTED=1
    log "got SIGUSR1: asking the training processes to checkpoint (SIGTERM to the job steps)"
    scancel --signal=TERM "$SLURM_JOB_ID" || log "scancel --signal=TERM failed"
}
trap on_usr1 USR1

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch: sbatch [options] slurm/train.sh CONFIG.yaml [key=value ...]"
[ $# -ge 1 ] || die "usage: sbatch [options] slurm/train.sh CONFIG.yaml [key=value ...]"
CONFIG=$1
shift
[ -f "$CONFIG" ] || die "config $CONFIG not found (relative paths are relative to $PWD)"

# The batch script runs from a copy in slurmd's spool folder: find the repository by the submit dir.
ROOT=${MODASEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
for f in modaseg/train.py launch/multi-node.yaml slurm/common.sh; do
    [ -f "$ROOT/$f" ] || die "$ROOT/$f not found: submit from the repository root or set MODASEG_ROOT"
done
# shellcheck source=slurm/common.sh
source "$ROOT/slurm/common.sh"
activate_env accelerate

# NCCL (GPU runs), each only when not set already (set it before sbatch to choose): a collective that
# waits longer than train.collective_timeout_minutes aborts NCCL and ends its process instead of
# hanging until the time limit (srun --kill-on-bad-exit then ends the other nodes); NCCL's warnings,
# not its INFO flood, in the job output. Network knobs (NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE): slurm/README.md.
if [ -z "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-}" ] && [ -z "${NCCL_ASYNC_ERROR_HANDLING:-}" ]; then
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
fi
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Run directory: train.output_dir from the overrides, else runs/slurm-JOBID. The job id survives a
# requeue, so the requeued run finds its checkpoints there and resumes (train.resume=auto).
RUN_DIR=""
for arg in "$@"; do
    case $arg in train.output_dir=*) RUN_DIR=${arg#train.output_dir=} ;; esac
done
if [ -z "$RUN_DIR" ]; then
    RUN_DIR=runs/slurm-$SLURM_JOB_ID
    set -- "$@" "train.output_dir=$RUN_DIR"
fi

# Processes per node: MODASEG_PROCS_PER_NODE, else the GPUs per node (a typed request such as
# "a100:8" counts 8), else 1 (CPU nodes).
GPUS=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
GPUS=${GPUS##*:}
PROCS=${MODASEG_PROCS_PER_NODE:-$GPUS}
[[ $PROCS =~ ^[0-9]+$ ]] || die "MODASEG_PROCS_PER_NODE must be a number, got '$PROCS'"
[ "$PROCS" -ge 1 ] || PROCS=1
NNODES=${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}
TOTAL=$((NNODES * PROCS))

# Rank 0 runs on the first node; every node resolves that name itself (resolving it here could give
# this node's loopback alias, e.g. Debian's 127.0.1.1, which the other nodes cannot reach).
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
getent hosts "$MAIN_HOST" >/dev/null || die "first node $MAIN_HOST does not resolve"
# A port per job and restart (the previous run's socket may linger), overridable.
PORT=${MODASEG_MAIN_PORT:-$((10000 + (SLURM_JOB_ID % 2000) * 10 + ${SLURM_RESTART_COUNT:-0} % 10))}

# Launcher flags common to every node; each node adds its own --machine_rank (see srun below).
# --mixed_precision no: train.py takes the precision from the config (optim.mixed_precision).
# One process in all: no launcher (accelerate refuses --multi_gpu with one process).
TRAIN=("$ROOT/modaseg/train.py" --config "$CONFIG" "$@")
LAUNCH_ARGS=(
    --config_file "$ROOT/launch/multi-node.yaml"
    --multi_gpu
    --num_machines "$NNODES"
    --num_processes "$TOTAL"
    --main_process_ip "$MAIN_HOST"
    --main_process_port "$PORT"
    --rdzv_backend static
    --dynamo_backend no
    --mixed_precision no
    "${TRAIN[@]}"
)
if [ "$TOTAL" -eq 1 ]; then
    LAUNCHER=python
    ARGS=("${TRAIN[@]}")
else
    LAUNCHER=accelerate
    ARGS=("${LAUNCH_ARGS[@]}")
fi

log "$NNODES node(s) ($SLURM_JOB_NODELIST) x $PROCS process(es) = $TOTAL; main process $MAIN_HOST:$PORT; run dir $RUN_DIR"
mkdir -p "$RUN_DIR"
STAMP=$RUN_DIR/.slurm-launch-$SLURM_JOB_ID
touch "$STAMP"

requeue() {
    NEWEST=$(find "$RUN_DIR/checkpoints" -maxdepth 1 -name 'step-*' -type d 2>/dev/null | sort | tail -n 1)
    log "newest checkpoint: ${NEWEST:-none}; requeueing (the next run resumes from it)"
    rm -f "$STAMP"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
}
[ "$PREEMPTED" = 0 ] || requeue # the signal came before the launch

# Per-node values stay escaped (single quotes) so each node expands its own SLURM_NODEID: the classic
# failure is every node computing machine rank 0 here, in the batch shell, and the rendezvous hanging.
# `srun ... &` + `wait`: bash runs a trap only between commands, never during a foreground srun.
srun --ntasks-per-node=1 --nodes="$NNODES" --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'echo "[modaseg] node $SLURMD_NODENAME: machine_rank $SLURM_NODEID of $SLURM_NNODES"
        if [ "$0" = python ]; then exec python "$@"; fi
        exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' \
    "$LAUNCHER" "${ARGS[@]}" &
SRUN_PID=$!
wait "$SRUN_PID"
RC=$?
# A trapped signal interrupts `wait` (status > 128): keep waiting until srun itself has ended.
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
    RC=$?
done

# Finished = a summary.json written by this run (train.py writes it last, after the final
# evaluation). Otherwise, after a preemption signal: requeue (launcher exit codes vary: torchrun
# reports its own SIGTERM as a failure while the training processes exit 75 after their checkpoint);
# the requeued run resumes from the newest checkpoint. Otherwise: a failure, not requeued.
FINISHED=0
[ "$RUN_DIR/summary.json" -nt "$STAMP" ] && FINISHED=1
rm -f "$STAMP"
if [ "$FINISHED" = 1 ]; then
    log "training finished (srun exit code $RC): $RUN_DIR/summary.json"
    exit 0
fi
if [ "$PREEMPTED" = 1 ]; then
    log "srun exited $RC after SIGUSR1"
    requeue
fi
[ "$RC" -ne 0 ] || RC=1
log "training failed: srun exit code $RC, no summary.json (not requeued; to resume, resubmit with train.output_dir=$RUN_DIR)"
exit "$RC"
