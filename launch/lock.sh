#!/usr/bin/env bash
# Re-locks requirements.lock: pyproject.toml's dependencies, its dev extra (which spells out onnx and
# pretrained) and its build backend, held by constraints.txt, every transitive package pinned with hashes, for
# Python 3.11 on Linux x86_64. pip-compile keeps the pins already in the lock and resolves only what changed;
# extra arguments go to it, e.g. `bash launch/lock.sh --upgrade-package numpy` to move one package.
# pip-tools runs from a throwaway venv; it reads pip's configuration for the indexes and local wheels, but
# not pip's constraint file, hence -c constraints.txt. About 1-2 minutes (a lock from scratch: 14).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "requirements.lock is compiled for Python 3.11: set PYTHON to a python3.11" >&2
  exit 1
fi
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$py" -m venv "$tools"
"$tools/bin/python" -m pip install -q pip-tools==7.6.2
CUSTOM_COMPILE_COMMAND="bash launch/lock.sh" "$tools/bin/pip-compile" -q --extra=dev --all-build-deps \
  --allow-unsafe --strip-extras --generate-hashes --no-emit-index-url --no-emit-find-links \
  -c constraints.txt -o requirements.lock "$@" pyproject.toml
