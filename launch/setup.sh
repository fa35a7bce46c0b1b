#!/usr/bin/env bash
# Creates .venv (if missing) with the exact pins of constraints.txt and installs modaseg into it.
# Idempotent: a second run with an up-to-date .venv only checks and returns.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp=.venv/.modaseg-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
echo "setting up .venv (pinned by constraints.txt; about 2 minutes the first time)" >&2
if ! .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" >.venv/install.log 2>&1; then
  tail -n 30 .venv/install.log >&2
  echo "install failed: see .venv/install.log" >&2
  exit 1
fi
echo "$want" > "$stamp"
