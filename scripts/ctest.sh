#!/usr/bin/env bash
# Configure, build and run the C++ unit tests of csrc/ against libtorch (CMakeLists.txt).
#   bash scripts/ctest.sh [BUILD_DIR]        (default build/cmake; uses .venv's python)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build/cmake}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
SITE=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX" -DPython3_EXECUTABLE="$(command -v "$PY" || echo "$PY")")
if [ -d /usr/local/cuda ]; then
  ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda)
fi
NVRTC=$(ls "$SITE"/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | head -n 1 || true)
if [ -n "$NVRTC" ]; then
  ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
fi
cmake -S . -B "$BUILD" "${ARGS[@]}" > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j"${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
