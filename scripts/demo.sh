#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole job on a simulated consortium on a local Ray:
# simulate -> ingest -> train -> impute -> export -> evaluate. Output in ./demo (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edice benchmark-quality "${1:-demo}" "${@:2}"
