#!/usr/bin/env bash
# Builds llama.cpp (llama-server, llama-quantize, libllama) from the source that the llama-cpp-python sdist on
# PyPI ships, and installs llama-cpp-python's bindings over that same library: one build, matching versions.
# Called by scripts/setup.sh; about 5 minutes on 2 cores. Usage: build_llamacpp.sh VENV
set -euo pipefail
VENV="$1"
VERSION="0.3.36"
ROOT="$VENV/llama.cpp"
SRC="$ROOT/llama_cpp_python-$VERSION"
BUILD="$ROOT/build"
if [ -x "$BUILD/bin/llama-server" ] && "$VENV/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
  exit 0
fi
mkdir -p "$ROOT"
echo "[setup] building llama.cpp (llama-cpp-python $VERSION source; ~5 min on 2 cores)"
start=$(date +%s)
"$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$ROOT" "llama-cpp-python==$VERSION" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
# ggml's AMX kernels stop with SIGILL where the kernel does not grant the tile state (this VM): build without them.
NO_AMX=""
if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" > "$ROOT/cmake.log" 2>&1 \
  || { tail -20 "$ROOT/cmake.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" --target llama-server llama-quantize llama > "$ROOT/build.log" 2>&1 \
  || { tail -30 "$ROOT/build.log"; exit 1; }
# the Python bindings without a second build of the library; they load it from llama_cpp/lib
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VENV/bin/pip" install --quiet "$SRC" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
PKG=$("$VENV/bin/python" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")
rm -rf "$PKG/lib"
ln -s "$(cd "$BUILD/bin" && pwd)" "$PKG/lib"
rm -rf "$SRC/vendor/llama.cpp/.git" "$ROOT/llama_cpp_python-$VERSION.tar.gz"
"$VENV/bin/python" -c "import llama_cpp" || { echo "[setup] llama_cpp does not import"; exit 1; }
echo "[setup] llama.cpp built in $(( $(date +%s) - start )) s"
