#!/usr/bin/env bash
# README command 2: set up .venv if needed, then run the test suite (CPU, a few minutes).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
