#!/usr/bin/env bash
# README command 1: set up .venv if needed, then run the demo on the embedded toy world:
# the shipped tiny CLIP, toy 15-1 with the full method, with fine-tuning and with joint training,
# and outputs/demo/report.html. Extra arguments go to `cisslib demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/cisslib demo "$@"
