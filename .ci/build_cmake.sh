#!/usr/bin/env bash
# Configures and builds the CMake (C++/libtorch) target of ultra_fast in a temporary build
# directory, then runs its C++ smoke test. CPU-only by default (fast); pass
# ULTRA_FAST_CMAKE_CUDA=ON to build the CUDA kernels too (needs CUDA_HOME / nvcc).
# Usage: bash .ci/build_cmake.sh [extra cmake -D options]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ultra_fast_cmake.XXXXXX")"
trap 'rm -rf "$BUILD_DIR"' EXIT

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
WITH_CUDA="${ULTRA_FAST_CMAKE_CUDA:-OFF}"
CUDA_ARGS=()
if [[ "$WITH_CUDA" == "ON" ]]; then
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  CUDA_ARGS=(-DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME")
fi
GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

echo "ultra_fast cmake: build dir $BUILD_DIR, CUDA=$WITH_CUDA, torch prefix $TORCH_PREFIX"
cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DULTRA_FAST_WITH_CUDA="$WITH_CUDA" \
  -DULTRA_FAST_BUILD_TESTS=ON \
  "${CUDA_ARGS[@]}" "$@"
cmake --build "$BUILD_DIR" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
(cd "$BUILD_DIR" && ctest --output-on-failure -V)
echo "ultra_fast cmake: OK"
