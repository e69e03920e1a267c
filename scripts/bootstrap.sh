#!/usr/bin/env bash
# Create .venv (Python 3.11 preferred) and install the tested set of packages
# (requirements-lock.txt), then cisslib itself (editable, no dependency resolution).
# Re-running is cheap: the install is skipped while pyproject.toml and the lock are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
  done
fi
if [ -z "$py" ]; then
  echo "bootstrap: no python3 found; install Python 3.11 (or set PYTHON=/path/to/python)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.cisslib-install
want="$(cat pyproject.toml requirements-lock.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "bootstrap: installing the locked packages into .venv (torch: a few GB the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-lock.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
