"""The compiled part of unigendet's packaging: the extension unigendet._C, and the subpackage list.

Everything declarative (name, version, dependencies, extras, the console script, the folder mapping
`engine/` -> `unigendet`, `kernels/` -> `unigendet.kernels`, package data) is in pyproject.toml. What
is left here needs code:
- the extension `unigendet._C`, compiled from `csrc/` (the "ext" backend of the backbone ops) against
  the torch installed at build time, so install with `pip install --no-build-isolation`;
- the subpackages of engine/ and kernels/, found on disk and named under `unigendet` (setuptools'
  own package discovery keeps the folder names, it cannot rename engine/ to unigendet).

Extension build switches (environment variables):
  UNIGENDET_NO_EXT=1      pure-Python install: the ops run on the reference (and Triton) backends.
  FORCE_CUDA=1            build the CUDA kernels even where torch sees no GPU; an error (no CPU-only
                          fallback) where torch has no CUDA or no CUDA toolkit (nvcc) is found.
  TORCH_CUDA_ARCH_LIST    GPU architectures for the CUDA kernels (default "9.0": H100/H200).
  MAX_JOBS                parallel compile jobs (ninja).
The CPU kernels are built whenever a C++ compiler is present, vectorised for this machine's best
instruction set (AVX512 or AVX2 as torch reports it); CUDA is added when torch has CUDA and a toolkit
is found. What was built is recorded in csrc/build_info.h and shown by `unigendet info`.
"""
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_INFO = CSRC / "build_info.h"  # generated; read back by engine/ops/ext_support.py via _C.build_info

# torch's CPU capability -> compiler flags for at::vec (the same names ATen uses for its kernels; at::vec's
# AVX2 half<->float conversions need F16C, which every AVX2 CPU has).
CPU_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _log(msg: str) -> None:
    print(f"unigendet setup: {msg}", file=sys.stderr)


def _point_torch_at_the_cuda_toolkit() -> None:
    """Set CUDA_HOME when torch's own guess would miss the toolkit's headers.

    torch takes CUDA_HOME (or CUDA_PATH) from the environment, else the folder above `which nvcc`. Where
    nvcc on PATH is a wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), that
    guess is /usr/local, which has no cuda_runtime.h, and the C++ sources of the CUDA build fail. nvcc
    itself knows where it lives: its dry run prints `TOP=<toolkit>/bin/..`.
    """
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    if (Path(nvcc).resolve().parents[1] / "include" / "cuda_runtime.h").exists():
        return
    import subprocess
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in dry.splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            if (top / "include" / "cuda_runtime.h").exists():
                os.environ["CUDA_HOME"] = str(top)
                _log(f"nvcc on PATH ({nvcc}) is not inside its toolkit; CUDA_HOME={top}")
            return


def _forced_cuda_missing(what: str) -> SystemExit:
    """The error for FORCE_CUDA=1 when the CUDA kernels cannot be built (no silent CPU-only build)."""
    return SystemExit(f"unigendet setup: FORCE_CUDA=1 but {what}, so the CUDA kernels of unigendet._C cannot "
                      "be built. Fix that, or unset FORCE_CUDA for a CPU-only extension.")


def _extension_plan():
    """(ext_modules, cmdclass) for unigendet._C, or ([], {}) with the reason logged."""
    if os.environ.get("UNIGENDET_NO_EXT", "") not in ("", "0"):
        _log("UNIGENDET_NO_EXT is set: building no extension (ops use the reference backend)")
        return [], {}
    forced = os.environ.get("FORCE_CUDA", "") == "1"
    _point_torch_at_the_cuda_toolkit()  # before cpp_extension reads CUDA_HOME at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        if forced:
            raise _forced_cuda_missing(f"torch is not importable at build time ({e}; with pip: "
                                       "--no-build-isolation)") from None
        _log("torch is not importable at build time: building no extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        if forced:
            raise _forced_cuda_missing(f"no C++ compiler ({cxx!r}) was found")
        _log(f"no C++ compiler ({cxx!r}) found: building no extension")
        return [], {}

    capability = torch.backends.cpu.get_cpu_capability()
    capability = capability if capability in CPU_FLAGS else ("AVX2" if capability.startswith("AVX2") else "DEFAULT")
    want_cuda = forced or torch.cuda.is_available()
    with_cuda = want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if forced:
        nvcc = None if CUDA_HOME is None else Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
        if torch.version.cuda is None:
            raise _forced_cuda_missing(f"torch {torch.__version__} has no CUDA (a CPU-only build of torch)")
        if nvcc is None:
            raise _forced_cuda_missing("no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME and CUDA_PATH unset, "
                                       "no /usr/local/cuda)")
        if not nvcc.exists():
            raise _forced_cuda_missing(f"the CUDA toolkit found at {CUDA_HOME} has no nvcc ({nvcc} is missing)")
    if want_cuda and not with_cuda:
        _log("CUDA requested but torch has no CUDA or no toolkit (CUDA_HOME) was found: CPU kernels only")
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0") if with_cuda else None

    info = {"cpu_capability": capability, "cuda": with_cuda, "cuda_arch_list": arch_list,
            "torch": torch.__version__, "compiler": cxx}
    text = ("// Generated by setup.py: what this build of unigendet._C contains.\n#pragma once\n"
            f"#define UNIGENDET_BUILD_INFO {json.dumps(json.dumps(info))}\n")
    if not BUILD_INFO.exists() or BUILD_INFO.read_text() != text:  # unchanged file: no rebuild
        BUILD_INFO.write_text(text)
    _log(f"building unigendet._C: {info}")

    sources = ["csrc/library.cpp", "csrc/cpu/ops.cpp"]
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers (without it the kernels run on one
    # thread); libgomp resolves to the copy torch already loaded (same soname).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"] + CPU_FLAGS[capability]
    link_flags = ["-fopenmp"]
    if not with_cuda:
        ext = CppExtension("unigendet._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    else:
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        sources += ["csrc/cuda/register.cpp"]
        ext = CUDAExtension("unigendet._C", sources, extra_compile_args={
            "cxx": cxx_flags + ["-DUNIGENDET_WITH_CUDA"],
            "nvcc": (CSRC / "cuda" / "nvcc_flags.txt").read_text().split()},  # also used by the CI compile test
            extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _packages() -> list[str]:
    """unigendet and every subpackage (a folder with __init__.py) of engine/ and kernels/, by import name."""
    found = ["unigendet"] + [f"unigendet.{name}" for name in find_packages(ROOT / "engine")]
    found += ["unigendet.kernels"] + [f"unigendet.kernels.{name}" for name in find_packages(ROOT / "kernels")]
    return found


ext_modules, cmdclass = _extension_plan()

setup(packages=_packages(), ext_modules=ext_modules, cmdclass=cmdclass)
