#!/bin/bash
# Sourced by slurm/train.sh and slurm/shard.sh once they know ROOT (the repository: MODASEG_ROOT, else
# the submit directory; SLURM runs a copy of the batch script from its spool folder) and define `die`.

# activate_env COMMAND: the Python environment, then a check that COMMAND is on PATH.
# MODASEG_VENV unset: ROOT/.venv when it exists; empty: PATH as exported (module load, conda activate);
# otherwise that virtual environment.
activate_env() {
    local venv=${MODASEG_VENV-}
    if [ -z "${MODASEG_VENV+set}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then venv=$ROOT/.venv; fi
    if [ -n "$venv" ]; then
        [ -f "$venv/bin/activate" ] || die "MODASEG_VENV=$venv has no bin/activate"
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    command -v "$1" >/dev/null || die "$1 is not on PATH (set MODASEG_VENV)"
}
