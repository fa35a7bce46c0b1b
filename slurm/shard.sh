#!/bin/bash
# Shard a COCO-format dataset with a SLURM array job: task I of K converts shards j with j % K == I
# (`modaseg-shard --num-tasks K --task-index I --resume`); one merge job, queued by the first task
# with --dependency=afterok on the whole array, writes manifest.json and re-hashes every shard.
#
#   sbatch --array=0-7 slurm/shard.sh --annotations modanet2018_instances_train.json \
#       --lmdb photos.lmdb --out shards/modanet [other modaseg-shard options]
#   MODASEG_SHARD_TASKS=8 sbatch --array=3,5 slurm/shard.sh ...    # re-run tasks 3 and 5 of 8
#
# Submit from the repository root (or set MODASEG_ROOT). See slurm/README.md.
#SBATCH --job-name=modaseg-shard
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -uo pipefail

log() { echo "[modaseg-shard $(date +%T) job ${SLURM_JOB_ID:-?}] $*"; }
die() {
    log "ERROR: $*" >&2
    exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch: sbatch --array=0-7 slurm/shard.sh --annotations ... --out ..."
[ $# -ge 1 ] || die "usage: sbatch --array=0-(K-1) slurm/shard.sh MODASEG-SHARD-OPTIONS"

# The batch script runs from a copy in slurmd's spool folder: find the repository by the submit dir.
ROOT=${MODASEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$ROOT/slurm/common.sh" ] || die "$ROOT/slurm/common.sh not found: submit from the repository root or set MODASEG_ROOT"
# shellcheck source=slurm/common.sh
source "$ROOT/slurm/common.sh"
activate_env modaseg-shard

# ------------------------------------------------------------------ the merge job (queued by task MIN)
if [ "${MODASEG_SHARD_MERGE:-0}" = 1 ]; then
    log "merging the shards of ${MODASEG_SHARD_TASKS} tasks"
    exec modaseg-shard "$@" --num-tasks "$MODASEG_SHARD_TASKS" --merge --verify --no-progress
fi

# ------------------------------------------------------------------ one array task
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "not an array job: submit with --array=0-(K-1), one task per slice"
if [ -n "${MODASEG_SHARD_TASKS:-}" ]; then
    TASKS=$MODASEG_SHARD_TASKS
elif [ "$SLURM_ARRAY_TASK_MIN" -eq 0 ] && [ "$SLURM_ARRAY_TASK_MAX" -eq $((SLURM_ARRAY_TASK_COUNT - 1)) ]; then
    TASKS=$SLURM_ARRAY_TASK_COUNT
else
    die "array indices must be 0..K-1 (e.g. --array=0-7); to re-run some of K tasks set MODASEG_SHARD_TASKS=K"
fi
[[ $TASKS =~ ^[0-9]+$ ]] && [ "$SLURM_ARRAY_TASK_ID" -lt "$TASKS" ] ||
    die "task index $SLURM_ARRAY_TASK_ID is not in 0..$((TASKS - 1)) (MODASEG_SHARD_TASKS=$TASKS)"

# The first task queues the merge once (not again when it is itself requeued). sbatch reads the
# script when submitting, so this job's spool copy ($0) can be submitted again.
if [ "$SLURM_ARRAY_TASK_ID" -eq "$SLURM_ARRAY_TASK_MIN" ] && [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
    STDOUT=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p' | head -n 1)
    LOG_DIR=$(dirname "${STDOUT:-$SLURM_SUBMIT_DIR/x}")
    MERGE_ID=$(env -u SBATCH_ARRAY_INX MODASEG_SHARD_MERGE=1 MODASEG_SHARD_TASKS="$TASKS" \
        sbatch --parsable --job-name="${SLURM_JOB_NAME}-merge" --ntasks=1 --cpus-per-task=1 \
        --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
        --chdir="$SLURM_SUBMIT_DIR" --output="$LOG_DIR/slurm-%x-%j.out" "$0" "$@") ||
        die "could not submit the merge job"
    log "merge job $MERGE_ID queued (runs when every task of array $SLURM_ARRAY_JOB_ID has succeeded)"
fi

log "task $SLURM_ARRAY_TASK_ID of $TASKS on $SLURMD_NODENAME"
# --workers first so that one given in the options wins; --resume keeps the shards a previous
# (failed, requeued) attempt of this task completed.
exec modaseg-shard --workers "${SLURM_CPUS_PER_TASK:-1}" "$@" \
    --num-tasks "$TASKS" --task-index "$SLURM_ARRAY_TASK_ID" --resume --no-progress
