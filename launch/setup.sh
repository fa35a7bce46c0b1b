#!/usr/bin/env bash
# Creates .venv (if missing) with exactly the packages of requirements.lock (every one pinned and
# hash-checked) and installs modaseg into it without dependencies (pyproject.toml's ranges are for other
# set-ups; README "Install by hand"). Fails, saying what to run, when the lock and pyproject.toml disagree.
# Idempotent: a second run with an up-to-date .venv only checks its stamp and returns.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp=.venv/.modaseg-installed
want=$(cat requirements.lock constraints.txt pyproject.toml launch/check_lock.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
start=$SECONDS
[ -x .venv/bin/python ] || "$py" -m venv .venv
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "requirements.lock is for Python 3.11; .venv has $(.venv/bin/python -V): remove .venv, set PYTHON" >&2
  exit 1
fi
echo "setting up .venv from requirements.lock (a fresh one, torch and CUDA included: ~5 minutes on 2 cores)" >&2
log=.venv/install.log
run() {
  if ! "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "set-up failed at: $*; see $log" >&2
    exit 1
  fi
}
: >"$log"
run .venv/bin/python -m pip install --require-hashes -r requirements.lock
.venv/bin/python launch/check_lock.py --sync-venv
run .venv/bin/python -m pip install --no-deps --no-build-isolation --check-build-dependencies -e .
echo "$want" >"$stamp"
echo "set up .venv in $((SECONDS - start)) s" >&2
