#!/usr/bin/env bash
# One command for an H100/H200 machine without internet (uses the torch/triton already installed):
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/results/gpu_check)
# 1. builds the extension unigendet._C with its CUDA kernels for sm_90 in place (engine/_C*.so), then
#    makes the package importable without installing anything (a copy under a temporary folder);
# 2. runs the GPU tests and the op tests (Triton kernels compiled for the real device, ext on CUDA);
# 3. measures the ceilings (copy bandwidth, bf16 matmul rate), then runs the attention, loss, norm,
#    activation, rope and train-step benchmarks on CUDA (bf16), writing CSV + markdown + PNG, and the
#    loader benchmark (DALI nvJPEG vs PIL, 10k JPEGs of 512 px) where nvidia-dali is installed.
#
# It keeps to a time budget (GPU_CHECK_BUDGET seconds, default 520: a lent machine's call is cut at
# 600): each stage gets at most its own limit and what is left, a stage that no longer fits is
# skipped with a line saying so, and the most important stages run first. The tables land in
# bench/results/<device>/ as with `unigendet bench`; after every stage they are also packed into
# OUT_DIR/results.tar.gz, beside OUT_DIR/gpu_check.log and build_ext.log, so that what finished comes
# back as three files even when the call is cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-520} ))
RESULTS="$PWD/bench/results"
STAMP="$(mktemp)"  # files newer than this one are this run's results
# The interpreter that holds torch: $PYTHON, else python3 (the lent machines' image names only that one
# for sure), else python.
PYBIN="${PYTHON:-$(command -v python3 || command -v python)}"
echo "python: $PYBIN"

pack() {  # the tables this run wrote (new or changed files), and the build log, into one tarball
    local files
    files=$(find "$RESULTS" -type f -newer "$STAMP" 2>/dev/null | sed "s|^$RESULTS/||")
    [ -n "$files" ] && tar -czf "$OUT_DIR/results.tar.gz" -C "$RESULTS" $files
}

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run within min(LIMIT, time left), then pack
    local name="$1" limit="$2"; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 30 )); then
        echo "== $name: SKIPPED (${left}s of the budget left)"; return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (at most ${limit}s; $(date +%T))"
    local t0=$(date +%s)
    timeout "$limit" "$@" || echo "$name FAILED or cut at ${limit}s (exit $?)"
    echo "   $name took $(( $(date +%s) - t0 ))s"
    pack
}

rm -f engine/_C*.so
stage "building unigendet._C with CUDA (sm_90)" 240 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS="${MAX_JOBS:-16}" bash -c '"$1" setup.py -q build_ext --inplace > "$0" 2>&1 \
    && echo "built: $(ls engine/_C*.so)" || { tail -40 "$0"; echo "EXTENSION BUILD FAILED"; exit 1; }' \
    "$OUT_DIR/build_ext.log" "$PYBIN"

PKG="$(mktemp -d)"
trap 'rm -rf "$PKG" "$STAMP"' EXIT
cp -r engine "$PKG/unigendet" && cp -r kernels "$PKG/unigendet/kernels"
export PYTHONPATH="$PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET UNIGENDET_BENCH_RESULTS

# The packages the tests and benchmarks import. A lent GPU machine has all but tomli-w (the config
# writer), which travels as the small pure-Python wheel in bench/offline_wheels/ (MIT licence).
MISSING=$("$PYBIN" - <<'PY'
import importlib.util
needed = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "safetensors": "safetensors", "tqdm": "tqdm",
          "tomli_w": "tomli-w", "sklearn": "scikit-learn", "skimage": "scikit-image", "triton": "triton",
          "pytest": "pytest"}
print(" ".join(pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$MISSING" ]; then
    echo "missing here: $MISSING; installing the wheels of bench/offline_wheels/"
    "$PYBIN" -m pip install -q --no-index --no-deps --target "$PKG" bench/offline_wheels/*.whl \
        || echo "OFFLINE WHEELS FAILED TO INSTALL"
fi

"$PYBIN" - <<'PY'
import torch, triton
from unigendet.ops import ext_support
print("unigendet._C:", ext_support.describe())
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY

PYTEST=("$PYBIN" -m pytest -q -p no:cacheprovider)
stage "ceilings (copy bandwidth, bf16 matmul)" 60 "$PYBIN" bench/ceilings.py --device cuda
OP_TESTS=(tests/test_ops_attention.py tests/test_ops_loss.py tests/test_ops_norm.py tests/test_ops_activation.py
          tests/test_ops_rope.py)
stage "GPU op tests (gpu-marked: realistic shapes, autotuned kernels)" 150 "${PYTEST[@]}" -m gpu "${OP_TESTS[@]}"
# the rest of the op tests on CUDA: many small odd shapes, each kernel with one fixed tile config
# (autotuning every shape would spend the budget on timing candidates)
stage "op tests on CUDA" 150 env UNIGENDET_TRITON_AUTOTUNE=0 "${PYTEST[@]}" -m "not gpu" "${OP_TESTS[@]}"
stage "CUDA graphs of the trainer (captured == eager, replays never sync)" 120 "${PYTEST[@]}" tests/test_graphs.py
stage "bench_attention" 150 "$PYBIN" bench/bench_attention.py --device cuda
stage "bench_loss" 90 "$PYBIN" bench/bench_loss.py --device cuda
for b in norm activation rope; do
    stage "bench_$b" 60 "$PYBIN" "bench/bench_$b.py" --device cuda
done
stage "bench_train_step" 150 "$PYBIN" bench/bench_train_step.py --device cuda --steps 20 \
    --providers reference,fused,fused+cuda_graphs
# The loaders need nvidia-dali, which the lent machines' image lacks and whose wheel is far over what a
# call can carry: measured where DALI is installed, said plainly where not.
if "$PYBIN" -c "import nvidia.dali" 2>/dev/null; then
    stage "bench_data" 180 "$PYBIN" bench/bench_data.py --device cuda --synthetic 10000 --source-size 512 \
        --sizes 256 --batches 100 --rounds 3
else
    echo "== bench_data: NOT RUN (nvidia-dali is not installed on this machine)"
fi
# Last, as it may not fit (inductor compiles each phase for minutes): all four side by side; when it
# completes, its table replaces the one above.
stage "bench_train_step with compile" 300 "$PYBIN" bench/bench_train_step.py --device cuda --steps 20 \
    --providers reference,reference+compile,fused,fused+cuda_graphs
echo "results: bench/results/<device>/ and $OUT_DIR/results.tar.gz"
