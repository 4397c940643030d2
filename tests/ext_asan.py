"""Runs pytest with `unigendet._C` replaced by a build of its CPU kernels with -fsanitize=address.

    python tests/ext_asan.py PYTEST_ARGS...   (with the ASan runtime preloaded: sanitizer.asan_env)

The build uses setup.py's compile flags for this CPU's instruction set (so the same vector paths
run), at -O1 -g, and is cached under build/ext_asan/ (ninja rebuilds it when csrc/ changes). It is
loaded before unigendet, so every "ext" op of the run goes through the sanitized kernels.
"""
import ast
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def setup_cpu_flags() -> dict[str, list[str]]:
    """setup.py's CPU_FLAGS (instruction set -> compiler flags), read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CPU_FLAGS":
            return ast.literal_eval(node.value)
    raise LookupError("setup.py defines no CPU_FLAGS")


def load_sanitized_extension():
    flags = setup_cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    capability = capability if capability in flags else ("AVX2" if capability.startswith("AVX2") else "DEFAULT")
    build = ROOT / "build" / "ext_asan"
    build.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name="_C", sources=[str(ROOT / "csrc" / "library.cpp"), str(ROOT / "csrc" / "cpu" / "ops.cpp")],
        extra_cflags=["-O1", "-g", "-std=c++20", "-fopenmp", "-fsanitize=address", "-fno-omit-frame-pointer",
                      *flags[capability]],
        extra_ldflags=["-fopenmp", "-fsanitize=address"], build_directory=str(build))
    sys.modules["unigendet._C"] = module
    return module


if __name__ == "__main__":
    print(f"sanitized unigendet._C: {load_sanitized_extension().__file__}", flush=True)
    sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
