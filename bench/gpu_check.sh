#!/usr/bin/env bash
# One command for an H100/H200 machine without internet (uses the torch/triton already installed):
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/results/gpu_check)
# 1. makes the package importable without installing anything (a copy under $OUT/.pkg);
# 2. runs the GPU tests and the op tests (Triton kernels compiled for the real device);
# 3. runs the attention and loss benchmarks on CUDA (bf16), writing CSV + markdown tables.
# Everything it prints is also written to OUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

PKG="$OUT_DIR/.pkg"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r engine "$PKG/unigendet" && cp -r kernels "$PKG/unigendet/kernels"
export PYTHONPATH="$PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UNIGENDET_BENCH_RESULTS="$OUT_DIR"
unset TRITON_INTERPRET

python - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY
echo "== op tests on CUDA (the gpu-marked ones included)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_ops_attention.py tests/test_ops_loss.py || echo "GPU TESTS FAILED"
echo "== benchmarks"
timeout 300 python bench/bench_attention.py --device cuda || echo "bench_attention FAILED"
timeout 180 python bench/bench_loss.py --device cuda || echo "bench_loss FAILED"
rm -rf "$PKG"
echo "results in $OUT_DIR"
