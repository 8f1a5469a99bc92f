#!/usr/bin/env bash
# Creates .venv and installs edice-dist with its test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edice-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned in pyproject.toml so pip takes the CPU wheel on machines without CUDA.
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
