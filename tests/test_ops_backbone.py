"""fused_add_rmsnorm, swiglu, qk_rmsnorm_rope (reference backend): semantics, dtypes, gradients."""
import pytest
import torch
import torch.nn.functional as F

from unigendet import ops

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_rmsnorm(dtype, atol, rtol, with_residual):
    x, r, w = torch.randn(37, 129).to(dtype), torch.randn(37, 129).to(dtype), torch.randn(129).to(dtype)
    y, res = ops.fused_add_rmsnorm(x, r if with_residual else None, w, eps=1e-6)
    want_res = x.double() + (r.double() if with_residual else 0)
    want_y = want_res / torch.sqrt(want_res.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert y.dtype == dtype and res.dtype == dtype
    torch.testing.assert_close(res.double(), want_res, atol=atol, rtol=rtol)
    torch.testing.assert_close(y.double(), want_y, atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_swiglu(dtype, atol, rtol):
    gu = torch.randn(33, 2 * 45).to(dtype)
    out = ops.swiglu(gu)
    want = F.silu(gu[:, :45].double()) * gu[:, 45:].double()
    assert out.shape == (33, 45) and out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(3, 5))


def test_qk_rmsnorm_rope_formula():
    B, T, H, Hkv, D = 2, 7, 4, 2, 16
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    qw, kw = torch.randn(D), torch.randn(D)
    ang = torch.randn(T, D // 2)
    q2, k2 = ops.qk_rmsnorm_rope(q, k, qw, kw, ang.cos(), ang.sin())
    for x, w, out in ((q, qw, q2), (k, kw, k2)):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        # rotate-half as a complex multiplication of pairs (x_j, x_{j + D/2})
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


def test_gradcheck_float64():
    x, r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, w: ops.fused_add_rmsnorm(x, r, w), (x, r, w))
    gu = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (gu,))
    q = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 4, dtype=torch.float64, requires_grad=True)
    qw, kw = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ops.qk_rmsnorm_rope(*a, ang.cos(), ang.sin()), (q, k, qw, kw))


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        ops.fused_add_rmsnorm(torch.randn(2, 4), None, torch.ones(5))
    with pytest.raises(ValueError, match="cos and sin"):
        ops.qk_rmsnorm_rope(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), torch.ones(4), torch.ones(4),
                            torch.ones(4, 2), torch.ones(4, 2))
