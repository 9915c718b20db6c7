#!/usr/bin/env bash
# Installs everything (first run only) and runs the end-to-end demo on the built-in demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qserve demo "$@"
