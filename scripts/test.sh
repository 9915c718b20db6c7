#!/usr/bin/env bash
# Installs everything (first run only) and runs the whole test suite, real-vLLM integration tests included.
# Quick tier only: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
