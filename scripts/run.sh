#!/usr/bin/env bash
# Set everything up and serve: local vLLM engine(s) + the router on http://127.0.0.1:8000/v1.
# Ctrl-C stops the router and every engine it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/spillover serve --config "${SPILLOVER_CONFIG:-models.yaml}" "$@"
