"""One name per op in every layer: an op's module in engine/ops/ shares its stem with its Triton kernels
(kernels/), its C++ and CUDA sources (csrc/), its tests and its benchmark; its backend-registry key is
the public function's name."""
import importlib
from pathlib import Path

from unigendet import backends, ops
from unigendet.benchrun import BENCH_OPS

ROOT = Path(__file__).resolve().parents[1]
CPU_HELPERS = {"vec_io"}  # csrc/cpu headers shared by the op headers, not ops of their own
KERNEL_HELPERS = {"common"}  # kernels/ module shared by the Triton kernels, not an op of its own
CPU_ONLY = {"attention"}  # extension ops with no CUDA source: on CUDA, attention is the Triton kernel
WHOLE_RUN_BENCHMARKS = {"train_step", "data"}  # benchmarks of the trainer and the loaders, not of one op


def op_modules() -> dict[str, object]:
    """{stem: module} of the engine/ops modules that define an op (an `OP` registry key)."""
    found = {}
    for path in sorted((ROOT / "engine" / "ops").glob("*.py")):
        module = importlib.import_module(f"unigendet.ops.{path.stem}")
        if hasattr(module, "OP"):
            found[path.stem] = module
    return found


def stems(folder: str, pattern: str) -> set[str]:
    return {p.stem for p in (ROOT / folder).glob(pattern)}


def test_registry_keys_are_the_public_functions():
    modules = op_modules()
    keys = {m.OP for m in modules.values()}
    assert keys == {op for op in backends.availability() if not op.startswith("toy_")}
    for stem, module in modules.items():
        fn = getattr(ops, module.OP)
        assert module.OP in ops.__all__ and fn.__module__ == module.__name__, (stem, module.OP)


def test_every_layer_names_an_op_by_its_module_stem():
    ops_stems = set(op_modules())
    assert {s.removeprefix("test_ops_") for s in stems("tests", "test_ops_*.py")} >= ops_stems
    assert stems("kernels", "*.py") - {"__init__"} - KERNEL_HELPERS <= ops_stems
    cuda = stems("csrc/cuda", "*.cu")
    cpu = stems("csrc/cpu", "*.h") - CPU_HELPERS
    assert cuda <= ops_stems and cpu <= ops_stems and cpu - CPU_ONLY == cuda  # CPU and CUDA alike
    assert CPU_ONLY <= cpu and not CPU_ONLY & cuda
    bench_scripts = {s.removeprefix("bench_") for s in stems("bench", "bench_*.py")}
    assert bench_scripts == set(BENCH_OPS)
    assert set(BENCH_OPS) - WHOLE_RUN_BENCHMARKS <= ops_stems
