#!/usr/bin/env bash
# Set everything up and run the whole suite: lint, types, unit and end-to-end tests
# (the e2e tests start the real vLLM CPU engine on the demo model once per session).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
