"""The extension unigendet._C as a whole: what it was built with, CUDA sources that compile, the ops
under torch.compile, and training with the ext backend against the reference backend."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sass
from op_testing import EXT_ONLY
from unigendet import ops
from unigendet.ops import ext_support

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"


@EXT_ONLY
def test_build_info_is_recorded_and_shown_by_info(capsys):
    assert ext_support.BUILD_INFO["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    assert ext_support.BUILD_INFO["torch"] == torch.__version__
    from unigendet.cli import main

    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "unigendet._C" in ln)
    assert "CPU kernels" in line and ext_support.BUILD_INFO["cpu_capability"] in line


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


# CI has nvcc (docs/design.md §9) and sets UNIGENDET_REQUIRE_NVCC=1 so that this can never be skipped there.
@pytest.mark.skipif(_nvcc() is None and os.environ.get("UNIGENDET_REQUIRE_NVCC") != "1", reason="no nvcc here")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")) or ["<none>"])
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    """Every .cu file compiles for sm_90 with the flags setup.py gives nvcc (torch's and ours): CUDA code
    that does not build cannot land, although no GPU runs it here. The sm_90 code is then read back:
    no kernel uses local memory (spills, run-time indexed arrays), and the vector-path kernels move
    whole packs (no 16-byte access split into narrower ones, which nvcc did for the second of two Pack
    stores in a loop body)."""
    assert source != "<none>", "no .cu files under csrc/cuda"
    assert _nvcc() is not None, "UNIGENDET_REQUIRE_NVCC=1 but nvcc was not found"
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = COMMON_NVCC_FLAGS + (CUDA_DIR / "nvcc_flags.txt").read_text().split()
    obj = tmp_path / "out.o"
    cmd = [_nvcc(), *flags, "-arch=sm_90", "-Xcompiler", "-Wall", "-Xptxas", "-v", "-c", str(CUDA_DIR / source),
           "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert sass.local_memory_kernels(proc.stderr) == [], proc.stderr

    cuobjdump = sass.cuobjdump()
    assert cuobjdump is not None, "no cuobjdump (it ships in the triton wheel) to read the sm_90 code"
    listing = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    kernels = sass.global_accesses(listing.stdout)
    vector_path = {name: acc for name, acc in kernels.items() if sass.pack_bytes(name)}
    assert vector_path, f"no vector-path kernel instantiation found in {source}: {sorted(kernels)}"
    for name, accesses in vector_path.items():
        assert sass.split_pack_accesses(name, accesses) == [], name
        assert any(a.bytes == sass.pack_bytes(name) for a in accesses), f"{name}: no access of one whole pack"


def test_sass_reader_finds_split_packs_and_local_memory():
    """The readers above on listings shaped like cuobjdump's and ptxas's: a 16-byte store split into
    four 4-byte stores is found, one 16-byte store is not, and neither is a scalar-path kernel."""
    sass_text = """
\t\tFunction : _ZN9unigendet4cuda17swiglu_bwd_kernelIfLi4EEEvPKT_S5_PS3_ll
        /*0580*/                   LDG.E.128 R8, desc[UR14][R8.64] ;
        /*0f20*/                   STG.E.128 desc[UR14][R18.64], R8 ;
        /*0f30*/                   STG.E desc[UR14][R38.64], R12 ;
        /*0f40*/                   STG.E desc[UR14][R38.64+0x4], R13 ;
        /*0f50*/                   STG.E desc[UR14][R38.64+0x8], R14 ;
        /*0f60*/                   STG.E desc[UR14][R38.64+0xc], R15 ;
\t\tFunction : _ZN9unigendet4cuda17swiglu_fwd_kernelI6__halfLi8EEEvPKT_PS4_ll
        /*0100*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E R9, desc[UR4][R6.64] ;
        /*0200*/                   STG.E.128.STRONG.SM desc[UR4][R2.64+0x10], R4 ;
\t\tFunction : _ZN9unigendet4cuda17swiglu_fwd_kernelIfLi1EEEvPKT_PS3_ll
        /*0200*/                   STG.E desc[UR4][R2.64+0x4], R4 ;
"""
    kernels = sass.global_accesses(sass_text)
    split, whole, scalar = kernels
    assert [a.offset for a in sass.split_pack_accesses(split, kernels[split])] == [4, 8, 12]
    assert sass.split_pack_accesses(whole, kernels[whole]) == [] and sass.pack_bytes(whole) == 16
    assert kernels[whole][0] == sass.Access("LDG", 16, "R2", 0) and kernels[whole][2].offset == 16
    assert sass.pack_bytes(scalar) is None and sass.split_pack_accesses(scalar, kernels[scalar]) == []
    log = ("ptxas info    : Function properties for k1\n    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill"
           " loads\nptxas info    : Function properties for k2\n    0 bytes stack frame, 0 bytes spill stores, "
           "0 bytes spill loads\n")
    assert sass.local_memory_kernels(log) == ["k1"]
    frame_only = log.replace("4 bytes spill stores, 8 bytes spill", "0 bytes spill stores, 0 bytes spill")
    assert sass.local_memory_kernels(frame_only) == ["k1"]


@pytest.mark.skipif(_nvcc() is None and os.environ.get("UNIGENDET_REQUIRE_NVCC") != "1", reason="no nvcc here")
def test_cuda_registration_compiles_against_torch_headers():
    """csrc/cuda/register.cpp (ATen side of the CUDA ops) passes the C++ compiler's syntax check with
    torch's headers and the toolkit's, as setup.py compiles it on a GPU machine (no CUDA torch here)."""
    from torch.utils.cpp_extension import include_paths

    assert _nvcc() is not None, "UNIGENDET_REQUIRE_NVCC=1 but nvcc was not found"
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             Path(_nvcc()).resolve().parents[1]]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()),
                        None)
    assert cuda_include is not None, f"no include/cuda_runtime.h under any of {homes}"
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *[f"-I{p}" for p in include_paths()], f"-I{cuda_include}", str(CUDA_DIR / "register.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cpu_kernels_compile_for_every_instruction_set(tmp_path):
    """setup.py compiles the CPU kernels for the build machine's instruction set only, so code or flags
    that one set rejects pass unseen on machines of another (the AVX2 flags lacked -mf16c, which
    at::vec's AVX2 fp16 conversions need, until the first AVX2-only machine). Each of setup.py's other
    sets is compiled here (object code only; nothing of it runs)."""
    import sysconfig

    from ext_asan import setup_cpu_flags
    from torch.utils.cpp_extension import include_paths

    built = (ext_support.BUILD_INFO or {}).get("cpu_capability")
    for capability, flags in setup_cpu_flags().items():
        if capability == built:
            continue  # make venv compiled this one with setup.py itself
        cmd = ["c++", "-std=c++20", "-O1", "-fopenmp", "-fPIC", *flags,
               *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
               "-c", str(ROOT / "csrc" / "cpu" / "ops.cpp"), "-o", str(tmp_path / f"ops_{capability}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{capability}: {' '.join(cmd)}\n{proc.stderr[-3000:]}"


@EXT_ONLY
def test_block_ops_under_torch_compile_fullgraph():
    """The three ext ops trace as single nodes (fake kernels + autograd registered from Python)."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    w_norm, w_q, w_k = torch.randn(32, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    gate_up_w = torch.randn(64, 32, generator=g) / 6
    ang = torch.randn(6, 4, generator=g)

    def block(x, r, w_norm, w_q, w_k, backend):
        h, res = ops.fused_add_rmsnorm(x, r, w_norm, backend=backend)
        q, k = ops.qk_rmsnorm_rope(h.view(2, 6, 4, 8), h.view(2, 6, 4, 8), w_q, w_k, ang.cos(), ang.sin(),
                                   backend=backend)
        return (ops.swiglu(h @ gate_up_w.T, backend=backend).sum() + (q * k).sum() + res.sum())

    def run(fn, backend):
        leaves = [t.clone().requires_grad_() for t in (x, r, w_norm, w_q, w_k)]
        out = fn(*leaves, backend)
        return [out, *torch.autograd.grad(out, leaves)]

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(compiled, "ext"), run(block, "reference")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@EXT_ONLY
def test_trainer_with_ext_matches_reference(tiny_overrides, tmp_path):
    """3 joint steps of the tiny config: ops.backend = ext (norm, swiglu, rope and the CPU attention on the
    extension; the other ops have no ext backend and choose as for auto) logs the losses of ops.backend =
    reference."""
    from unigendet import load_config
    from unigendet.train import Trainer

    def run(backend):
        out = tmp_path / backend
        cfg = load_config("tiny_cpu", tiny_overrides + [
            "--train.steps=3", "--train.save_every=3", "--train.log_every=1", "--phases.mode=joint",
            f"--train.out_dir={out}", f"--ops.backend={backend}"])
        Trainer(cfg, log=lambda *_: None).train()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    try:
        ref, ext = run("reference"), run("ext")
    finally:
        ops.set_default_backend("auto")
    assert len(ref) == len(ext) == 3
    for a, b in zip(ref, ext):
        for key in ("joint/flow", "joint/bce", "joint/align", "joint/auth"):
            assert key in a
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])


BACKBONE_OP_TESTS = ["tests/test_ops_rmsnorm.py", "tests/test_ops_swiglu.py", "tests/test_ops_rope.py",
                     "tests/test_ops_attention_ext.py"]


def _backbone_op_cases():
    """{op: (run(backend) -> scalar to backprop, leaves, bytes of the op's outputs)} on mid-size inputs."""
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    x, r, w, gu = leaf(512, 1024), leaf(512, 1024), leaf(1024), leaf(512, 2048)
    q, k, qw, kw = leaf(2, 64, 4, 64), leaf(2, 64, 2, 64), leaf(64), leaf(64)
    ang = torch.randn(64, 32, generator=g)
    return {
        "fused_add_rmsnorm": (lambda be: sum(t.sum() for t in ops.fused_add_rmsnorm(x, r, w, 1e-6, backend=be)),
                              [x, r, w], 2 * x.nbytes),
        "swiglu": (lambda be: ops.swiglu(gu, backend=be).sum(), [gu], gu.nbytes // 2),
        "qk_rmsnorm_rope": (lambda be: sum(t.sum() for t in ops.qk_rmsnorm_rope(q, k, qw, kw, ang.cos(), ang.sin(),
                                                                              backend=be)),
                            [q, k, qw, kw], q.nbytes + k.nbytes),
    }


@EXT_ONLY
@pytest.mark.parametrize("op", ["fused_add_rmsnorm", "swiglu", "qk_rmsnorm_rope"])
def test_ext_ops_allocate_their_outputs_and_gradients_only(op):
    """Forward + backward through the ext op allocate the outputs, the input gradients and a few
    per-row / per-column partials: no temporaries of the input's size (eager allocates 2x-10x more)."""
    from allocations import allocated

    run, leaves, out_bytes = _backbone_op_cases()[op]
    needed = out_bytes + sum(t.nbytes for t in leaves)
    seen = {}
    for backend in ("ext", "reference"):
        with allocated() as a:
            run(backend).backward()
        seen[backend] = a.bytes
        for t in leaves:
            t.grad = None
    assert seen["ext"] <= 1.1 * needed, (seen, needed)
    assert seen["reference"] >= 2 * needed, (seen, needed)  # the check can tell fused from eager


@EXT_ONLY
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ (the sanitized build and its runtime are GCC's)")
def test_cpu_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """The op tests of the backbone ops and the CPU attention again, with unigendet._C rebuilt with -fsanitize=address
    (tests/ext_asan.py; about 40 s the first time): no CPU kernel reads or writes outside a tensor's
    bytes on any of their shapes (vector tails, odd widths, strided q / k, every dtype)."""
    from sanitizer import asan_env, asan_reports

    run = subprocess.run([sys.executable, "tests/ext_asan.py", "-q", "-x", *BACKBONE_OP_TESTS], cwd=ROOT,
                         env=asan_env(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{asan_reports(tmp_path)}"
    assert "sanitized unigendet._C: " in run.stdout and " passed" in run.stdout
    # the kernels were compiled with the instrumentation (a report function per access size)
    so = run.stdout.split("sanitized unigendet._C: ")[1].split()[0]
    symbols = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True).stdout
    assert "__asan_report_load" in symbols


@EXT_ONLY
def test_cpu_kernels_with_non_temporal_stores_forced():
    """The CPU kernels stream outputs past the caches (non-temporal stores) only above 32 MiB, which no
    op test reaches: the op tests of the three ops again with UNIGENDET_CPU_NT_STORES=1 (read once per
    process) run that path on all their shapes and dtypes."""
    env = {**os.environ, "UNIGENDET_CPU_NT_STORES": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *BACKBONE_OP_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout
