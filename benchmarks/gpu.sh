#!/usr/bin/env bash
# Build, test and benchmark ultra_fast on a CUDA machine. From the repository root:
#
#     bash benchmarks/gpu.sh                # results under ./results (or "$OUT")
#
# Steps: build the native extension (CPU + CUDA kernels), run the CUDA-marked tests of
# tests/test_ops.py and tests/test_engine.py (the marker is "cuda", pyproject.toml; test_engine.py has
# none at the time of writing, so pytest deselects it), then `ultra-fast bench` for the clip_b16
# geometry (random weights, 224 px, all patch tokens, + segmentation) in float32 and bfloat16, and the
# cuda rows of benchmarks/bench_engine.py with their markdown summary.
#
# Environment: OUT (results folder), MODEL (default vit_base_patch16_clip_224), SIZE (224),
# DEVICE (cuda; "cpu" only to check this script), SKIP_BUILD=1 (use the extension already built),
# REPEATS (5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT_DIR="${OUT:-results}"
MODEL="${MODEL:-vit_base_patch16_clip_224}"
SIZE="${SIZE:-224}"
DEVICE="${DEVICE:-cuda}"
REPEATS="${REPEATS:-5}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
# The checkout itself comes first on the path: an editable install elsewhere must not shadow it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DEVICE" == cuda ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu_info.csv"
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  echo "== build"
  # In place, so the run uses exactly this checkout (no network needed: --no-build-isolation).
  "$PY" setup.py build_ext --inplace 2>&1 | tail -n 5
fi
"$PY" - "$DEVICE" <<'EOF'
import sys
from ultra_fast import ops
print("native build:", ops.build_info())
if not ops.is_available(sys.argv[1]):
    sys.exit(f"gpu.sh: the native ops are not available for {sys.argv[1]}")
EOF

echo "== tests (-m cuda)"
status=0
"$PY" -m pytest -q tests/test_ops.py tests/test_engine.py -m cuda 2>&1 | tee "$OUT_DIR/gpu_tests.txt" || status=$?
# 5 = nothing selected (no cuda-marked tests): not a failure of this machine.
if [[ $status -ne 0 && $status -ne 5 ]]; then
  echo "gpu.sh: tests failed (exit $status); see $OUT_DIR/gpu_tests.txt" >&2
  exit $status
fi

echo "== ultra-fast bench"
for dtype in float32 bfloat16; do
  "$PY" -m ultra_fast bench --model "$MODEL" --pretrained 0 --device "$DEVICE" --dtype "$dtype" --size "$SIZE" \
    --targets patches --repeats "$REPEATS" --warmup 2 --segment --json > "$OUT_DIR/gpu_bench_${dtype}.json"
  cat "$OUT_DIR/gpu_bench_${dtype}.json"; echo
done

echo "== benchmarks/bench_engine.py (-k $DEVICE)"
"$PY" -m pytest -q benchmarks/bench_engine.py -k "$DEVICE" -p no:cacheprovider \
  --benchmark-group-by=group --benchmark-columns=min,median,rounds \
  --benchmark-json="$OUT_DIR/gpu_bench_engine.json"
"$PY" benchmarks/summarize.py "$OUT_DIR/gpu_bench_engine.json" | tee "$OUT_DIR/gpu_bench_engine.md"
echo "gpu.sh: results in $OUT_DIR"
