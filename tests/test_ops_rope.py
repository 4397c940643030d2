"""qk_rmsnorm_rope on every backend, and the 2-D axial RoPE tables: semantics, dtypes, gradients,
strided inputs, the ext op's registrations."""
import pytest
import torch

from op_testing import (BACKENDS, EXT_ONLY, LOW_PRECISION, assert_accurate, assert_within_2x_eager, gpu_only,
                        leaf, run_with_grads)
from unigendet import backends, ops
from unigendet.ops.reference import qk_rmsnorm_rope_ref
from unigendet.ops.rope import OP, _ext_check

# (B, T, H, Hkv, D)
SHAPES = [(2, 7, 4, 2, 16), (1, 37, 3, 1, 32), (3, 5, 2, 2, 96), (1, 1, 1, 1, 2)]


def make_inputs(B, T, H, Hkv, D, dtype, seed=0, device="cpu", fused_qkv=False):
    """q, k (strided views of one qkv projection when fused_qkv), weights, cos, sin; upstream grads."""
    g = torch.Generator().manual_seed(seed)
    if fused_qkv:
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(device=device, dtype=dtype)
        q, k, _v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
        q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
    else:
        q, k = (torch.randn(B, T, h, D, generator=g).to(device=device, dtype=dtype) for h in (H, Hkv))
    qw, kw = (1 + 0.3 * torch.randn(D, generator=g)).to(device), (1 + 0.3 * torch.randn(D, generator=g)).to(device)
    ang = (3 * torch.randn(T, D // 2, generator=g)).to(device)
    up = [torch.randn(B, T, h, D, generator=g).to(device=device, dtype=dtype) for h in (H, Hkv)]
    return [q, k, qw, kw, ang.cos(), ang.sin()], up


def run(backend, inputs, upstream, dtype=None):
    q, k, qw, kw, cos, sin = inputs
    args = [leaf(q, dtype), leaf(k, dtype), leaf(qw, dtype), leaf(kw, dtype), cos.to(dtype or cos.dtype),
            sin.to(dtype or sin.dtype)]
    fn = qk_rmsnorm_rope_ref if backend == "exact" else (lambda *a: ops.qk_rmsnorm_rope(*a, backend=backend))
    outs, grads = run_with_grads(fn, args, upstream)
    return outs + grads


def test_formula_is_a_complex_rotation_of_the_normalised_pairs():
    B, T, H, Hkv, D = 2, 7, 4, 2, 16
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    qw, kw = torch.randn(D), torch.randn(D)
    ang = torch.randn(T, D // 2)
    q2, k2 = ops.qk_rmsnorm_rope(q, k, qw, kw, ang.cos(), ang.sin())
    for x, w, out in ((q, qw, q2), (k, kw, k2)):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        z = torch.complex(n[..., : D // 2], n[..., D // 2:]) * torch.polar(torch.ones_like(ang), ang)[None, :, None]
        torch.testing.assert_close(out, torch.cat([z.real, z.imag], -1), atol=1e-5, rtol=1e-5)


def test_axial_rope_is_relative_in_2d():
    """<R(p) q, R(p') k> depends only on p - p' (row and column offsets), and registers are not rotated."""
    grid, D = 5, 16
    cos, sin = ops.axial_rope_tables(grid, D, base=100.0, prefix=2)
    assert cos.shape == (2 + grid * grid, D // 2)
    assert torch.all(cos[:2] == 1) and torch.all(sin[:2] == 0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    ones = torch.ones(D)

    def rotated(x, idx):
        return ops.qk_rmsnorm_rope(x, x, ones, ones, cos[idx:idx + 1], sin[idx:idx + 1])[0].flatten()

    def score(pq, pk):  # positions as (row, col) on the grid
        return rotated(q, 2 + pq[0] * grid + pq[1]) @ rotated(k, 2 + pk[0] * grid + pk[1])

    torch.testing.assert_close(score((1, 1), (0, 3)), score((3, 2), (2, 4)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score((1, 1), (0, 3)), score((1, 1), (3, 0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_fp32_matches_fp64_forward_and_backward(backend, shape, fused_qkv):
    inputs, upstream = make_inputs(*shape, torch.float32, seed=shape[-1], fused_qkv=fused_qkv)
    got, exact = run(backend, inputs, upstream), run("exact", inputs, upstream, torch.float64)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    for g, e in zip(got, exact):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-4)  # weight grads sum over rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_2x_eager(backend, dtype):
    inputs, upstream = make_inputs(2, 9, 4, 2, 64, dtype, seed=3, fused_qkv=True)
    got, eager = run(backend, inputs, upstream), run("reference", inputs, upstream)
    assert got[0].dtype == got[1].dtype == dtype
    assert_within_2x_eager(got, eager, run("exact", inputs, upstream, torch.float64), dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    q = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 4, dtype=torch.float64, requires_grad=True)
    qw, kw = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ang = torch.randn(3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ops.qk_rmsnorm_rope(*a, ang.cos(), ang.sin(), backend=backend),
                                    (q, k, qw, kw))


def test_shape_errors():
    with pytest.raises(ValueError, match="cos and sin"):
        ops.qk_rmsnorm_rope(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), torch.ones(4), torch.ones(4),
                            torch.ones(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"\(B, T, H, D\)"):
        ops.qk_rmsnorm_rope(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.ones(4), torch.ones(4),
                            torch.ones(3, 2), torch.ones(3, 2))


# ----------------------------------------------------------------------------- ext backend


@EXT_ONLY
def test_cos_sin_that_require_grad_go_to_the_reference():
    (q, k, qw, kw, cos, sin), _ = make_inputs(1, 3, 2, 1, 8, torch.float32)
    cos.requires_grad_()
    assert "constants" in _ext_check(q, k, qw, kw, cos, sin)
    assert backends.select(OP, "auto", q, k, qw, kw, cos, sin) is qk_rmsnorm_rope_ref
    with pytest.raises(ops.BackendError, match="constants"):
        ops.qk_rmsnorm_rope(q, k, qw, kw, cos, sin, backend="ext")


@EXT_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    (q, k, qw, kw, cos, sin), (gq, gk) = make_inputs(2, 5, 3, 1, 32, dtype, seed=4, fused_qkv=True)
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(), qw.requires_grad_(), kw.requires_grad_(),
            cos, sin, 1e-6)
    torch.library.opcheck(torch.ops.unigendet.qk_rmsnorm_rope, args)
    with torch.no_grad():
        _q2, _k2, q_rstd, k_rstd = torch.ops.unigendet.qk_rmsnorm_rope(*args)
    torch.library.opcheck(torch.ops.unigendet.qk_rmsnorm_rope_backward,
                          (gq, gk, q, k, qw.detach(), kw.detach(), cos, sin, q_rstd, k_rstd))


@EXT_ONLY
def test_weight_grads_are_bitwise_reproducible_across_thread_counts():
    inputs, upstream = make_inputs(4, 33, 6, 2, 64, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run("ext", inputs, upstream))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@EXT_ONLY
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_ext_meets_the_accuracy_rule_on_cpu(dtype):
    """The rule the CUDA test below applies, here on the CPU kernels (same helper)."""
    assert_accurate(run, *make_inputs(2, 9, 3, 1, 32, dtype, seed=7, fused_qkv=True))


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("shape", [(2, 37, 4, 2, 32), (1, 300, 8, 2, 64), (2, 50, 3, 3, 96), (1, 129, 4, 1, 128),
                                   (1, 17, 2, 1, 6), (1, 9, 2, 1, 256), (1, 5, 2, 1, 1024)])  # last: generic kernels
@pytest.mark.parametrize("fused_qkv", [False, True])
@gpu_only
def test_cuda_within_2x_eager(dtype, shape, fused_qkv):
    inputs, upstream = make_inputs(*shape, dtype, seed=6, device="cuda", fused_qkv=fused_qkv)
    assert_accurate(run, inputs, upstream)
