#!/usr/bin/env bash
# One command for an H100/H200 machine without internet (uses the torch/triton already installed):
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/results/gpu_check)
# 1. builds the extension unigendet._C with its CUDA kernels for sm_90 in place (engine/_C*.so), then
#    makes the package importable without installing anything (a copy under $OUT/.pkg);
# 2. runs the GPU tests and the op tests (Triton kernels compiled for the real device, ext on CUDA);
# 3. measures the ceilings (copy bandwidth, bf16 matmul rate), then runs the attention, loss, norm,
#    activation, rope and train-step benchmarks on CUDA (bf16), writing CSV + markdown + PNG, and the
#    loader benchmark (DALI nvJPEG vs PIL, 10k JPEGs of 512 px) where nvidia-dali is installed.
# Everything it prints is also written to OUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

echo "== building unigendet._C with CUDA (sm_90)"
rm -f engine/_C*.so
if FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" timeout 300 \
        python setup.py -q build_ext --inplace > "$OUT_DIR/build_ext.log" 2>&1; then
    echo "built: $(ls engine/_C*.so)"
else
    tail -40 "$OUT_DIR/build_ext.log"; echo "EXTENSION BUILD FAILED"
fi

PKG="$OUT_DIR/.pkg"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r engine "$PKG/unigendet" && cp -r kernels "$PKG/unigendet/kernels"
export PYTHONPATH="$PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UNIGENDET_BENCH_RESULTS="$OUT_DIR"
unset TRITON_INTERPRET

python - <<'PY'
import torch, triton
from unigendet.ops import ext_support
print("unigendet._C:", ext_support.describe())
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY
echo "== op tests on CUDA (the gpu-marked ones included)"
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_ops_attention.py tests/test_ops_loss.py \
    tests/test_ops_norm.py tests/test_ops_activation.py tests/test_ops_rope.py || echo "GPU TESTS FAILED"
echo "== CUDA graphs of the trainer (captured == eager, replays never sync)"
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_graphs.py || echo "GRAPH TESTS FAILED"
echo "== ceilings (copy bandwidth, bf16 matmul)"
timeout 60 python bench/ceilings.py --device cuda || echo "ceilings FAILED"
echo "== benchmarks"
timeout 300 python bench/bench_attention.py --device cuda || echo "bench_attention FAILED"
timeout 180 python bench/bench_loss.py --device cuda || echo "bench_loss FAILED"
for b in norm activation rope; do
    timeout 120 python "bench/bench_$b.py" --device cuda || echo "bench_$b FAILED"
done
timeout 200 python bench/bench_train_step.py --device cuda --steps 20 --providers reference,fused,fused+cuda_graphs \
    || echo "bench_train_step FAILED"
# The loaders need nvidia-dali, which the device image lacks and whose wheel is far over what a call can
# carry: measured where DALI is installed, said plainly where not.
if python -c "import nvidia.dali" 2>/dev/null; then
    timeout 240 python bench/bench_data.py --device cuda --synthetic 10000 --source-size 512 --sizes 256 \
        --batches 100 --rounds 3 || echo "bench_data FAILED"
else
    echo "bench_data NOT RUN: nvidia-dali is not installed on this machine"
fi
# Last, as it may not fit the lease (inductor compiles each phase for minutes): all four side by side;
# when it completes, its table replaces the one above.
timeout 300 python bench/bench_train_step.py --device cuda --steps 20 \
    --providers reference,reference+compile,fused,fused+cuda_graphs || echo "bench_train_step with compile FAILED"
rm -rf "$PKG"
echo "results in $OUT_DIR"
