"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator of tests/cuda_emu, held to the accuracy
rule of the GPU tests (test_ops_*.py::test_cuda_*): this is the CPU test of the same logic.

Shapes are picked to reach every kernel variant: scalar and 16-byte paths (odd sizes, misaligned
views), rmsnorm rows cached in registers or read twice (cols above 16k / 8k elements), narrow and
wide row groups, grids that loop (3 emulated SMs), fewer and more rows than weight-gradient
partials, grouped and generic RoPE kernels, strided q / k views of a fused qkv projection.
Each kernel runs twice with different thread interleavings and must give the same bits. The traffic
tests count the kernels' loads and stores (tests/cuda_emu/trace.cpp): one pass over each row, 16-byte
packs. The last tests repeat this module under AddressSanitizer (out-of-bounds accesses of the kernels)
and with gcov (every line of every kernel instantiation runs).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emu
import test_ops_rmsnorm as rmsnorm
import test_ops_rope as rope
import test_ops_swiglu as swiglu
from op_testing import LOW_PRECISION, NO_EXT, assert_accurate, leaf, run_with_grads
from sanitizer import asan_env, asan_reports

pytestmark = pytest.mark.skipif(NO_EXT or cuda_emu.compiler() is None,
                                reason="pure-Python install (UNIGENDET_NO_EXT set) or no g++")
VARIANT = cuda_emu.variant()  # plain here; asan / coverage when the tests at the end rerun this module
SANITIZED = VARIANT == "asan"
# under ASan fp16 is left out: its memory accesses are bf16's (same width, same paths)
DTYPES = [torch.float32, torch.bfloat16] if SANITIZED else [torch.float32] + LOW_PRECISION


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts 1 element past a 16-byte boundary (scalar kernel path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------- the emulator itself
@pytest.mark.parametrize("tpr", [1, 2, 8, 32, 64, 256])
def test_row_group_sum_sums_each_group_and_every_lane_agrees(tpr):
    x = torch.randn(256)
    out = cuda_emu.selftest("row_group_sum", x, 256, tpr)
    groups = out.view(-1, tpr)
    torch.testing.assert_close(groups[:, 0], x.view(-1, tpr).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))  # the same bits in every lane


@pytest.mark.parametrize("threads", [32, 96, 1024])
def test_block_sum_twice_in_a_row(threads):
    x = torch.randn(threads)
    out = cuda_emu.selftest("block_sum", x, threads)
    torch.testing.assert_close(out, (x.sum() * x).sum().expand(threads), rtol=1e-4, atol=1e-4)


def test_a_missing_barrier_shows_as_a_race():
    """Thread t reads its predecessor's shared slot: right with __syncthreads under every interleaving;
    without it some thread always reads before its predecessor wrote (a scheduler that ran threads in
    order would hide this): the traced build reports that read, the sanitized one returns stale values."""
    expected = lambda base: (base + torch.arange(64.0)).roll(1)  # noqa: E731
    for base in range(5):
        out = cuda_emu.selftest("neighbour", torch.tensor([100.0 * base]), 64, 1)
        assert torch.equal(out, expected(100.0 * base))
    for base in range(5):
        if SANITIZED:
            out = cuda_emu.selftest("neighbour", torch.tensor([1e4 + base]), 64, 0)
            assert not torch.equal(out, expected(1e4 + base))
        else:
            with pytest.raises(RuntimeError, match="__shared__ memory .* that no thread of this block has written"):
                cuda_emu.selftest("neighbour", torch.tensor([1e4 + base]), 64, 0)


def test_divergent_barrier_partial_warp_and_bad_launch_are_errors():
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0, 0, 0\).*1 threads have exited"):
        cuda_emu.selftest("early_exit", torch.zeros(1), 64)
    with pytest.raises(RuntimeError, match="full mask names lanes that do not exist"):
        cuda_emu.selftest("row_group_sum", torch.zeros(48), 48, 16)
    with pytest.raises(RuntimeError, match=r"invalid configuration argument: invalid block \(2048, 1, 1\)"):
        cuda_emu.selftest("block_sum", torch.zeros(2048), 2048)
    torch.testing.assert_close(cuda_emu.selftest("block_sum", torch.ones(64), 64), torch.full((64,), 4096.0))


# ---------------------------------------------------------------- fused_add_rmsnorm
def run_rmsnorm_emulated(inputs, upstream):
    args = [leaf(t) if t is not None else None for t in inputs]
    outs, grads = run_with_grads(lambda x, r, w: cuda_emu.fused_add_rmsnorm(x, r, w, 1e-6), args, upstream)
    return outs + grads


# (rows, cols): scalar / vector, row groups of 1..1024 threads (backward: 64- and 128-thread groups
# combine 4 and 2 copies per block through shared memory at 512 and 1024 columns), rows around the
# 12 partials, uncached forward (> 16384 elements per row) and backward (> 8192), vector and scalar
# (odd width); with these every kernel instantiation runs (checked with gcov)
NORM_SHAPES = [(37, 129), (300, 64), (1, 1), (33, 512), (20, 1024), (5, 1027), (8, 4096), (2, 9000), (3, 20000),
               (2, 16411)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_fused_add_rmsnorm_kernels(dtype, with_residual, shape):
    inputs, upstream = rmsnorm.make_inputs(shape, dtype, with_residual, seed=6)
    got = assert_accurate(rmsnorm.run, inputs, upstream, candidate=run_rmsnorm_emulated)
    assert not any(t.isnan().any() for t in got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm_scalar_path_gives_the_vector_paths_numbers(dtype):
    inputs, upstream = rmsnorm.make_inputs((19, 256), dtype, seed=3)
    slow = run_rmsnorm_emulated([misaligned(inputs[0]), *inputs[1:]], [misaligned(upstream[0]), upstream[1]])
    fast = run_rmsnorm_emulated(inputs, upstream)
    for a, b in zip(slow[:3], fast[:3]):  # y, res, grad_x: per-element, same arithmetic
        assert torch.equal(a, b)
    torch.testing.assert_close(slow[4], fast[4], rtol=1e-5, atol=1e-5)  # grad_w: another summation order


# ---------------------------------------------------------------- swiglu
def run_swiglu_emulated(gate_up, upstream):
    outs, grads = run_with_grads(cuda_emu.swiglu, [leaf(gate_up)], [upstream])
    return outs + grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 2 * 45), (2, 3, 2 * 64), (1, 2), (7, 2 * 1031), (40, 2 * 256)])
def test_swiglu_kernels(dtype, shape):
    gate_up, upstream = swiglu.make_inputs(shape, dtype, seed=6, scale=3.0)
    assert_accurate(swiglu.run, gate_up, upstream, candidate=run_swiglu_emulated)
    assert torch.equal(run_swiglu_emulated(misaligned(gate_up), upstream)[0], run_swiglu_emulated(gate_up, upstream)[0])


def test_swiglu_extreme_gates_stay_finite():
    gate_up = torch.tensor([[100.0, -100.0, 0.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(cuda_emu.swiglu_forward(gate_up), torch.tensor([[100.0, -0.0, 0.0]]))
    grad = cuda_emu.swiglu_backward(torch.ones(1, 3), gate_up)
    assert grad.isfinite().all()


# ---------------------------------------------------------------- rmsnorm + RoPE
def run_rope_emulated(inputs, upstream):
    q, k, qw, kw, cos, sin = inputs
    outs, grads = run_with_grads(cuda_emu.qk_rmsnorm_rope, [leaf(q), leaf(k), leaf(qw), leaf(kw), cos, sin], upstream)
    return outs + grads


# (B, T, H, Hkv, D): grouped kernels of 1, 2, 4, 8, 16 and 32 lanes (vector and scalar), generic kernels
# (D = 130 scalar, D = 1024 vector), rows around the partials count
ROPE_SHAPES = [(2, 7, 4, 2, 16), (1, 37, 3, 1, 32), (3, 5, 2, 2, 96), (1, 1, 1, 1, 2), (1, 5, 2, 1, 64),
               (1, 3, 2, 1, 256), (1, 3, 2, 1, 130), (1, 2, 2, 1, 1024), (2, 9, 2, 2, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_qkv", [False, True])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_qk_rmsnorm_rope_kernels(dtype, fused_qkv, shape):
    inputs, upstream = rope.make_inputs(*shape, dtype, seed=6, fused_qkv=fused_qkv)
    got = assert_accurate(rope.run, inputs, upstream, candidate=run_rope_emulated)
    assert not any(t.isnan().any() for t in got)


# ---------------------------------------------------------------- memory traffic
def assert_traffic(stats: dict, reads: dict[str, int], writes: list[str], width: int):
    """Activation buffers move as the kernels claim: each of `reads` loaded in exactly that many
    passes and never written, each of `writes` stored once and never read, every access `width` bytes."""
    for name, passes in reads.items():
        s = stats[name]
        assert (s["loaded"], s["stored"]) == (passes * s["bytes"], 0), f"{name}: {s}"
        assert s["accesses"] * width == s["loaded"], f"{name}: {s} (expected {width}-byte accesses)"
    for name in writes:
        s = stats[name]
        assert (s["loaded"], s["stored"]) == (0, s["bytes"]), f"{name}: {s}"
        assert s["accesses"] * width == s["stored"], f"{name}: {s} (expected {width}-byte accesses)"


traced = pytest.mark.skipif(SANITIZED, reason="the sanitized build is not instrumented for tracing")


@traced
@pytest.mark.parametrize("dtype, shape, misalign, width, fwd_passes, bwd_passes", [
    (torch.bfloat16, (8, 4096), False, 16, 1, 1),   # rows cached in registers, 16-byte packs
    (torch.float32, (8, 4096), False, 16, 1, 1),
    (torch.bfloat16, (2, 9000), False, 16, 1, 2),   # backward reads a row twice above 8192 elements
    (torch.bfloat16, (3, 20000), False, 16, 2, 2),  # forward too above 16384
    (torch.float32, (7, 129), False, 4, 1, 1),      # odd width: scalar path
    (torch.bfloat16, (19, 256), True, 2, 1, 1),     # misaligned x: scalar path
])
def test_fused_add_rmsnorm_reads_each_row_once_in_16_byte_packs(dtype, shape, misalign, width, fwd_passes,
                                                                 bwd_passes):
    (x, r, w), (gy, gr) = rmsnorm.make_inputs(shape, dtype)
    x = misaligned(x) if misalign else x
    with cuda_emu.trace() as t:
        _, res, rstd = cuda_emu.rmsnorm_forward(x, r, w, 1e-6)
        cuda_emu.rmsnorm_backward(misaligned(gy) if misalign else gy, gr, res, w, rstd)
    assert_traffic(t["fused_add_rmsnorm_fwd"][0], {"x": fwd_passes, "residual": fwd_passes}, ["y", "res"], width)
    # the backward's second pass re-reads grad_y and res; grad_res is read once, in that pass
    assert_traffic(t["fused_add_rmsnorm_bwd"][0], {"grad_y": bwd_passes, "res": bwd_passes, "grad_res": 1},
                   ["grad_x"], width)


@traced
@pytest.mark.parametrize("dtype, width", [(torch.bfloat16, 16), (torch.float32, 16), (torch.float16, 16)])
def test_swiglu_moves_each_element_once_in_16_byte_packs(dtype, width):
    gate_up, upstream = swiglu.make_inputs((40, 2 * 256), dtype)
    with cuda_emu.trace() as t:
        cuda_emu.swiglu_forward(gate_up)
        cuda_emu.swiglu_backward(upstream, gate_up)
    assert_traffic(t["swiglu_fwd"][0], {"gate_up": 1}, ["out"], width)
    assert_traffic(t["swiglu_bwd"][0], {"grad_out": 1, "gate_up": 1}, ["grad_gate_up"], width)


@traced
@pytest.mark.parametrize("dtype, D, passes, fwd_width, bwd_width", [
    (torch.bfloat16, 128, 1, 16, 8),   # grouped kernels; the backward moves 4 elements per access (kBwdVec)
    (torch.float32, 96, 1, 16, 16),
    (torch.bfloat16, 1024, 2, 16, 8),  # generic kernels: a second pass over the row
    (torch.float32, 30, 1, 4, 4),      # half = 15: scalar path
])
def test_qk_rmsnorm_rope_reads_each_head_vector_once(dtype, D, passes, fwd_width, bwd_width):
    (q, _k, qw, _kw, cos, sin), (gq, _gk) = rope.make_inputs(2, 9, 2, 1, D, dtype)
    with cuda_emu.trace() as t:
        out, rstd = cuda_emu.rope_forward(q, qw, cos, sin, 1e-6)
        cuda_emu.rope_backward(gq, q, qw, cos, sin, rstd)
    assert_traffic(t["rmsnorm_rope_fwd"][0], {"x": passes}, ["out"], fwd_width)
    assert_traffic(t["rmsnorm_rope_bwd"][0], {"grad_out": passes, "x": passes}, ["grad_x"], bwd_width)


# ---------------------------------------------------------------- AddressSanitizer
def rerun_this_module(variant: str, env: dict) -> subprocess.CompletedProcess:
    """This test file in a subprocess on the emulator's build `variant` (its meta tests skip there)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", Path(__file__).name],
                          cwd=Path(__file__).resolve().parent, env={**env, "UNIGENDET_CUDA_EMU": variant},
                          capture_output=True, text=True)


@pytest.mark.skipif(VARIANT != "plain", reason="run from the plain build's session")
def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """This module again with the kernels built with -fsanitize=address: every kernel above stays inside
    its buffers (torch allocates exactly the requested bytes); and a kernel that reads one element past
    its input is caught, so the check is live."""
    cuda_emu.library_path("asan")  # build here, so a compile error shows in this test
    env = asan_env(tmp_path, UNIGENDET_CUDA_EMU="asan")

    overrun = subprocess.run([sys.executable, "-c", "import torch, cuda_emu; "
                              "cuda_emu.selftest('overrun', torch.zeros(64), 64)"],
                             cwd=Path(__file__).resolve().parent, env=env, capture_output=True, text=True)
    report = asan_reports(tmp_path)
    assert overrun.returncode != 0 and "heap-buffer-overflow" in report, f"{overrun.stderr[-2000:]}\n{report}"
    assert "in overrun_kernel" in report
    for p in tmp_path.glob("asan*"):
        p.unlink()

    run = rerun_this_module("asan", env)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{asan_reports(tmp_path)}"
    assert " passed" in run.stdout


# ---------------------------------------------------------------- coverage
@pytest.mark.skipif(VARIANT != "plain", reason="run from the plain build's session")
@pytest.mark.skipif(shutil.which("gcov") is None, reason="no gcov")
def test_every_line_of_every_kernel_runs(tmp_path):
    """This module again with the kernels built for gcov: every line of every instantiation in each
    csrc/cuda/*.cu runs on some shape above, so no path of the CUDA code is left to the GPU alone."""
    build = cuda_emu.library_path("coverage").parent
    for counters in build.glob("*.gcda"):
        counters.unlink()
    run = rerun_this_module("coverage", dict(os.environ))
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    unrun = []
    for src in sorted(cuda_emu.CUDA_DIR.glob("*.cu")):
        subprocess.run(["gcov", "-o", str(build), str(build / f"{src.name}.o")], cwd=tmp_path, capture_output=True,
                       check=True)
        unrun += [f"{src.name}: {line.strip()}" for line in (tmp_path / f"{src.name}.gcov").read_text().splitlines()
                  if line.lstrip().startswith(("#####", "====="))]
    assert not unrun, "lines that no test shape runs:\n" + "\n".join(unrun[:40])
