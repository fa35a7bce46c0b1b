#!/usr/bin/env bash
# The test suite: lint + format check + every test (slow, multi-process and integration included).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` for a quick loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
