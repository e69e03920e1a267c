#!/usr/bin/env bash
# The GPU check of issue 13 in one call (at most 8 minutes on one H100/H200; no network):
#   bash benchmarks/gpu_check.sh [--dry] [--compile] [--precision bf16|fp16|fp32]
# --dry rehearses every part on CPU with the tiny CLIP (seconds; the test suite runs it).
# Figures go to $OUT/gpu_check.{md,json} when OUT is set, else outputs/gpu_check/; copy the
# table into benchmarks/RESULTS.md and the README's speed notes.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
out="${OUT:-outputs}/gpu_check"
[ -n "${OUT:-}" ] && out="$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CISSLIB_CACHE="${CISSLIB_CACHE:-$out/cache}"
limit=470
case " $* " in *" --dry "*) limit=420 ;; esac
if [ "$limit" = 470 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout --signal=INT "$limit" "$py" -m benchmarks.gpu --out "$out" "$@"
