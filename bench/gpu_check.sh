#!/usr/bin/env bash
# One command for an H100/H200 machine without internet (uses the torch/triton already installed):
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/results/gpu_check)
# Before, on a machine with the network: `make offline-wheels` (the few packages such a machine lacks, as
# wheels in bench/offline_wheels/). That folder is git-ignored: name bench/offline_wheels among the paths
# carried with the working tree to the GPU machine, or it does not arrive there.
# 1. builds the extension unigendet._C with its CUDA kernels for sm_90 in place (engine/_C*.so), then
#    makes the package importable without installing anything (a copy under a temporary folder);
# 2. measures the ceilings (copy bandwidth, bf16 matmul rate), runs the extension's GPU op tests, the
#    rmsnorm, swiglu, rope, loss and attention benchmarks on CUDA (bf16; CSV + markdown + PNG), the
#    CUDA-graph tests of the trainer and the train-step benchmark;
# 3. then, as far as the time allows, the Triton op tests (each kernel compiled for the real device),
#    the loader benchmark (DALI nvJPEG vs PIL) where nvidia-dali is installed, and the train step with
#    torch.compile, on the reference and on the fused ops (its own table, bench_train_step_compile).
#
# Time budget: GPU_CHECK_BUDGET seconds (default 520; a lent machine's call is cut at about 560). Each
# stage runs under `timeout` with min(its limit, what is left), and is skipped with a line saying so when
# under 30 s are left. Compiling is what costs here (nvcc, Triton kernels, their autotuning, inductor),
# so the cheap and important stages come first and the compile-heavy tests last. Expected seconds on
# an H200 with 16 cores (guesses until a first run; the log ends with what each stage took):
#   stage                                               limit  expected
#   setup: tool versions, package copy, import probe       -       10
#   build unigendet._C (6 translation units, ninja)       180       45  (75 on 2 busy CPU cores)
#   ceilings                                               30       10
#   ext op tests, gpu-marked (rmsnorm, swiglu, rope)       60       25
#   ext op tests, the rest of those three files            30       10
#   bench_rmsnorm, bench_swiglu, bench_rope          45/45/60  25/25/35
#   bench_loss: 256k x 1024, 1M x 3584;
#     ours, eager, compile                                 70       50
#   bench_attention: published shape, both layouts;
#     ours, sdpa_dense, flex, fa2; fwd, fwd+bwd           150      120
#   test_graphs (fixed Triton configs)                     60       30
#   bench_train_step: reference, fused, +cuda_graphs      100       70
#                                                            sum:  ~455
#   test_ops_loss, test_ops_attention (gpu-marked, then the rest): whatever is left (each compiles
#     dozens of Triton variants, fp32 ones 5-30 s each); bench_data where DALI is installed; the latent
#     base_256 step split (limit 120, expected ~60) when >= 150 s are left; the train step with
#     torch.compile only when >= 240 s are left.
# The benchmarks rewrite their tables after every measured case, so a stage cut by its limit keeps what
# finished. The tables land in bench/results/<device>/ as with `unigendet bench`; after every stage they
# are also packed into OUT_DIR/results.tar.gz, beside OUT_DIR/gpu_check.log and build_ext.log, so that
# what finished comes back as three files even when the call is cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
T_START=$(date +%s)
DEADLINE=$(( T_START + ${GPU_CHECK_BUDGET:-520} ))
RESULTS="$PWD/bench/results"
STAMP="$(mktemp)"  # files newer than this one are this run's results
# The interpreter that holds torch: $PYTHON, else python3 (the lent machines' image names only that one
# for sure), else python.
PYBIN="${PYTHON:-$(command -v python3 || command -v python)}"
echo "python: $PYBIN; budget ${GPU_CHECK_BUDGET:-520}s; $(nproc) cores; $(date)"
for tool in nvcc ninja; do echo "$tool: $(command -v "$tool" || echo "NOT FOUND")"; done
command -v nvcc >/dev/null && nvcc --version | tail -2
command -v nvidia-smi >/dev/null && nvidia-smi -L
export PYTHONUNBUFFERED=1  # a stage killed by its time limit still leaves its output in the log

pack() {  # the tables this run wrote (new or changed files), and the build log, into one tarball
    local files
    files=$(find "$RESULTS" -type f -newer "$STAMP" ! -name '*.tmp' 2>/dev/null | sed "s|^$RESULTS/||")
    [ -n "$files" ] && tar -czf "$OUT_DIR/results.tar.gz" -C "$RESULTS" $files
}

SUMMARY=""
stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run within min(LIMIT, time left), then pack
    local name="$1" limit="$2"; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 30 )); then
        echo "== $name: SKIPPED (${left}s of the budget left)"
        SUMMARY+=$(printf '\n  %-70s skipped' "$name"); return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (at most ${limit}s; $(date +%T), $(( $(date +%s) - T_START ))s into the run)"
    local t0=$(date +%s) rc=0 status=ok
    timeout -k 5 "$limit" "$@" || rc=$?
    if (( rc == 124 || rc == 137 )); then status="CUT at ${limit}s"; elif (( rc != 0 )); then status="FAILED (exit $rc)"; fi
    [ "$status" != ok ] && echo "$name $status"
    echo "   $name took $(( $(date +%s) - t0 ))s"
    SUMMARY+=$(printf '\n  %-70s %4ss  %s' "$name" "$(( $(date +%s) - t0 ))" "$status")
    pack
}

rm -f engine/_C*.so
stage "build unigendet._C with CUDA (sm_90)" 180 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS="${MAX_JOBS:-16}" bash -c '"$1" setup.py -q build_ext --inplace > "$0" 2>&1 \
    && echo "built: $(ls engine/_C*.so)" || { tail -40 "$0"; echo "EXTENSION BUILD FAILED"; exit 1; }' \
    "$OUT_DIR/build_ext.log" "$PYBIN"

PKG="$(mktemp -d)"
trap 'rm -rf "$PKG" "$STAMP"' EXIT
cp -r engine "$PKG/unigendet" && cp -r kernels "$PKG/unigendet/kernels"
export PYTHONPATH="$PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET UNIGENDET_BENCH_RESULTS UNIGENDET_TRITON_AUTOTUNE

# The packages the tests and benchmarks import. A lent GPU machine has all but tomli-w (the config
# writer), which arrives as a wheel in bench/offline_wheels/ (made by `make offline-wheels`, see above).
MISSING=$("$PYBIN" - <<'PY'
import importlib.util
needed = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "safetensors": "safetensors", "tqdm": "tqdm",
          "tomli_w": "tomli-w", "sklearn": "scikit-learn", "skimage": "scikit-image", "triton": "triton",
          "pytest": "pytest"}
print(" ".join(pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$MISSING" ]; then
    WHEELS=(bench/offline_wheels/*.whl)
    if [ -e "${WHEELS[0]}" ]; then
        echo "missing here: $MISSING; installing the wheels of bench/offline_wheels/"
        "$PYBIN" -m pip install -q --no-index --no-deps --target "$PKG" "${WHEELS[@]}" \
            || echo "OFFLINE WHEELS FAILED TO INSTALL"
    else
        echo "missing here: $MISSING; NO WHEELS in bench/offline_wheels/: run \`make offline-wheels\` on a" \
             "machine with the network and carry bench/offline_wheels with the tree (tests needing them fail)"
    fi
fi

timeout -k 5 60 "$PYBIN" - <<'PY' || echo "IMPORT PROBE FAILED"
import torch, triton
from unigendet.ops import ext_support
print("unigendet._C:", ext_support.describe())
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY

# -v: a test file cut by its limit shows in the log which test it was in
PYTEST=("$PYBIN" -m pytest -v -p no:cacheprovider)
# UNIGENDET_TRITON_AUTOTUNE=0 (correctness runs): each Triton kernel with one fixed tile config instead of
# compiling and timing every candidate per shape; the benchmarks autotune.
FIXED=(env UNIGENDET_TRITON_AUTOTUNE=0)
EXT_TESTS=(tests/test_ops_rmsnorm.py tests/test_ops_swiglu.py tests/test_ops_rope.py)

stage "ceilings (copy bandwidth, bf16 matmul)" 30 "$PYBIN" -m bench.ceilings --device cuda
stage "ext op tests on CUDA (gpu-marked: rmsnorm, swiglu, rope)" 60 "${PYTEST[@]}" -m gpu "${EXT_TESTS[@]}"
stage "ext op tests, the rest of those files" 30 "${PYTEST[@]}" -m "not gpu" "${EXT_TESTS[@]}"
stage "bench_rmsnorm" 45 "$PYBIN" -m bench.bench_rmsnorm --device cuda
stage "bench_swiglu" 45 "$PYBIN" -m bench.bench_swiglu --device cuda
stage "bench_rope" 60 "$PYBIN" -m bench.bench_rope --device cuda
# the large shapes only (16k rows is launch-bound); torch.compile last within each shape
stage "bench_loss (256k x 1024, 1M x 3584)" 70 "$PYBIN" -m bench.bench_loss --device cuda \
    --shapes 262144:1024,1048576:3584 --providers ours,eager,compile
# the published shape first (the goals of docs/benchmarks.md), the published layout first; no eager provider (the
# per-pair fp32 reference) and no separate bwd mode
stage "bench_attention (published shape first)" 150 "$PYBIN" -m bench.bench_attention --device cuda \
    --providers ours,sdpa_dense,flex,fa2 --layouts published,bidirectional --modes fwd,fwd+bwd
stage "CUDA graphs of the trainer (captured == eager, replays never sync)" 60 "${FIXED[@]}" "${PYTEST[@]}" \
    tests/test_graphs.py
stage "bench_train_step" 100 "$PYBIN" -m bench.bench_train_step --device cuda --steps 20 \
    --providers reference,fused,fused+cuda_graphs
# Triton op tests last: many odd shapes and dtypes, each a compile of its own (fp32 IEEE dots 5-30 s)
stage "Triton op tests: loss" 60 "${FIXED[@]}" "${PYTEST[@]}" tests/test_ops_loss.py
stage "Triton op tests: attention, gpu-marked (realistic shapes, autotuned)" 120 "${PYTEST[@]}" -m gpu \
    tests/test_ops_attention.py
stage "Triton op tests: attention, the rest" 120 "${FIXED[@]}" "${PYTEST[@]}" -m "not gpu" \
    tests/test_ops_attention.py
# The loaders need nvidia-dali, which the lent machines' image lacks and whose wheel is far over what a
# call can carry: measured where DALI is installed, said plainly where not.
if "$PYBIN" -c "import nvidia.dali" 2>/dev/null; then
    stage "bench_data" 180 "$PYBIN" -m bench.bench_data --device cuda --synthetic 10000 --source-size 512 \
        --sizes 256 --batches 100 --rounds 3
else
    echo "== bench_data: NOT RUN (nvidia-dali is not installed on this machine)"
fi
# The latent base_256 step with its split (VAE encode / decode, sampler, model, optimizer), with time to spare:
# a random VAE of the FLUX VAE's shape, so it needs diffusers (its row says so where it is missing).
LEFT=$(( DEADLINE - $(date +%s) ))
if (( LEFT >= 150 )); then
    stage "bench_train_step --latent (base_256, the VAE's share)" 120 "$PYBIN" -m bench.bench_train_step \
        --device cuda --latent --steps 20 --warmup 5
else
    echo "== bench_train_step --latent: SKIPPED (${LEFT}s left; needs 150)"
fi
# Only with time to spare (inductor compiles each phase of the model for minutes); its own table, so that
# a run cut short never replaces bench_train_step's.
LEFT=$(( DEADLINE - $(date +%s) ))
if (( LEFT >= 240 )); then
    stage "bench_train_step with compile" 300 "$PYBIN" -m bench.bench_train_step --device cuda --steps 20 \
        --providers reference,reference+compile,fused,fused+compile --name bench_train_step_compile
else
    echo "== bench_train_step with compile: SKIPPED (${LEFT}s left; needs 240)"
fi
echo "== summary ($(( $(date +%s) - T_START ))s of ${GPU_CHECK_BUDGET:-520}s):$SUMMARY"
echo "results: bench/results/<device>/ and $OUT_DIR/results.tar.gz"
