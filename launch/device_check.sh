#!/usr/bin/env bash
# GPU check of the compiled mask ops, sized for < 5 minutes on one GPU:
#   1. builds the ops with CUDA (cmake, against the installed CUDA build of torch),
#   2. runs tests/test_ops*.py (the CUDA tests run when a GPU is visible),
#   3. runs the kernel benchmark on CUDA (quick shapes) and prints its table.
# Usage (repository root, on the GPU machine): bash launch/device_check.sh [results-dir]
# Needs: a CUDA build of torch, nvcc, cmake, ninja, pytest in the active Python.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${1:-results/device_check}"
BUILD="build/device_check"
mkdir -p "$OUT"

"$PYTHON" - <<'PY'
import torch
assert torch.version.cuda, "device_check: this torch has no CUDA; install a CUDA build of torch"
assert torch.cuda.is_available(), "device_check: no CUDA device visible"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name(0))
PY

# Build only for the GPU in the machine: quicker than the default sm_80 + sm_90.
ARCH="$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHSFT_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DPython_EXECUTABLE="$(command -v "$PYTHON")" | tail -n 3
cmake --build "$BUILD" --parallel
LIB="$(ls "$BUILD"/_C*.so | head -n 1)"
export HSFT_OPS_LIBRARY="$PWD/$LIB" HSFT_REQUIRE_COMPILED_OPS=1

"$PYTHON" -m pytest tests/test_ops.py tests/test_ops_build.py -q -ra 2>&1 | tee "$OUT/pytest.txt" | tail -n 25

"$PYTHON" launch/bench_kernels.py --device cuda --quick --out "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -n 22
