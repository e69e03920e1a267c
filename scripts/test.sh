#!/usr/bin/env bash
# README command 2: set up .venv if needed, then lint (ruff check + format check, 100 columns)
# and run the test suite (CPU). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not browser"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check cisslib tests benchmarks
.venv/bin/ruff format --check cisslib tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
