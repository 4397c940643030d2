"""fused_add_rmsnorm on every backend: semantics, dtypes, gradients, the ext op's registrations."""
import pytest
import torch

from op_testing import (BACKENDS, EXT_ONLY, LOW_PRECISION, assert_accurate, assert_within_2x_eager, gpu_only,
                        leaf, run_with_grads)
from unigendet import ops
from unigendet.ops.rmsnorm import OP, fused_add_rmsnorm_ext
from unigendet.ops.reference import fused_add_rmsnorm_ref

SHAPES = [(37, 129), (3, 7, 96), (1, 1), (5, 1027)]


def make_inputs(shape, dtype, with_residual=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x, r, w = (torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in (shape, shape, shape[-1:]))
    gy, gr = (torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return [x, r if with_residual else None, w], [gy, gr]


def run(backend, inputs, upstream, dtype=None):
    args = [leaf(t, dtype) if t is not None else None for t in inputs]
    fn = (lambda x, r, w: fused_add_rmsnorm_ref(x, r, w, 1e-6)) if backend == "exact" else \
        (lambda x, r, w: ops.fused_add_rmsnorm(x, r, w, 1e-6, backend=backend))
    outs, grads = run_with_grads(fn, args, [u.to(dtype) if dtype else u for u in upstream])
    return outs + grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_fp32_matches_fp64_forward_and_backward(backend, shape, with_residual):
    inputs, upstream = make_inputs(shape, torch.float32, with_residual, seed=len(shape))
    got, exact = run(backend, inputs, upstream), run("exact", inputs, upstream, torch.float64)
    for g, e in zip(got, exact):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-4)  # weight grad sums over rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(37, 129), (5, 1027)])
def test_low_precision_within_2x_eager(backend, dtype, shape):
    inputs, upstream = make_inputs(shape, dtype, seed=3)
    got, eager = run(backend, inputs, upstream), run("reference", inputs, upstream)
    assert all(t.dtype == dtype for t in got)
    assert_within_2x_eager(got, eager, run("exact", inputs, upstream, torch.float64), dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, r, w = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 6), (3, 6), (6,)))
    assert torch.autograd.gradcheck(lambda *a: ops.fused_add_rmsnorm(*a, backend=backend), (x, r, w))
    assert torch.autograd.gradcheck(lambda x, w: ops.fused_add_rmsnorm(x, None, w, backend=backend), (x, w))


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        ops.fused_add_rmsnorm(torch.randn(2, 4), None, torch.ones(5))
    with pytest.raises(ValueError, match="residual shape"):
        ops.fused_add_rmsnorm(torch.randn(2, 4), torch.randn(2, 5), torch.ones(4))


# ----------------------------------------------------------------------------- ext backend


@EXT_ONLY
def test_auto_picks_ext_on_cpu_and_env_forces_reference(monkeypatch):
    x, w = torch.randn(4, 8), torch.ones(8)
    assert ops.available_backends()[OP][0] == "ext"
    from unigendet import backends

    assert backends.select(OP, "auto", x, None, w) is fused_add_rmsnorm_ext
    monkeypatch.setenv("UNIGENDET_BACKEND", "reference")
    assert backends.select(OP, "auto", x, None, w) is fused_add_rmsnorm_ref


@EXT_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    (x, r, w), (gy, gr) = make_inputs((5, 33), dtype, seed=4)
    for residual in (r, None):
        args = (x.requires_grad_(), residual, w.requires_grad_(), 1e-6)
        torch.library.opcheck(torch.ops.unigendet.fused_add_rmsnorm, args)
    with torch.no_grad():
        _y, res, rstd = torch.ops.unigendet.fused_add_rmsnorm(x, r, w, 1e-6)
    w = w.detach()
    for grad_res in (gr, None):
        torch.library.opcheck(torch.ops.unigendet.fused_add_rmsnorm_backward, (gy, grad_res, res, w, rstd))


@EXT_ONLY
def test_weight_grad_is_bitwise_reproducible_across_thread_counts():
    (x, r, w), (gy, gr) = make_inputs((1000, 257), torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run("ext", [x, r, w], [gy, gr]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@EXT_ONLY
def test_ext_accepts_fp32_weight_with_bf16_activations_and_reports_bad_dtypes():
    """Under autocast the weight stays fp32 while activations are bf16; its gradient keeps its dtype."""
    x, w = torch.randn(6, 40, dtype=torch.bfloat16), torch.randn(40, requires_grad=True)
    y, res = ops.fused_add_rmsnorm(x, x, w, backend="ext")
    y.float().sum().backward()
    assert y.dtype == res.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(y, fused_add_rmsnorm_ref(x, x, w)[0], atol=2e-2, rtol=2e-2)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        torch.ops.unigendet.fused_add_rmsnorm(x, x.float(), w, 1e-6)
    with pytest.raises(ops.BackendError, match="dtype torch.int32 unsupported"):
        ops.fused_add_rmsnorm(torch.ones(2, 4, dtype=torch.int32), None, torch.ones(4), backend="ext")


@EXT_ONLY
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_ext_meets_the_accuracy_rule_on_cpu(dtype):
    """The rule the CUDA test below applies, here on the CPU kernels (same helper)."""
    assert_accurate(run, *make_inputs((33, 200), dtype, seed=7))


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", [(37, 129), (33, 512), (20, 1024), (300, 4096), (8, 12288), (2, 16411)])
@gpu_only
def test_cuda_within_2x_eager(dtype, with_residual, shape):
    inputs, upstream = make_inputs(shape, dtype, with_residual, seed=6, device="cuda")
    assert_accurate(run, inputs, upstream)


@EXT_ONLY
def test_ext_refuses_mixed_x_and_residual_dtypes():
    """The kernels read x and residual as one dtype: a mix is refused by name, and `auto` takes the
    reference instead of failing inside the op."""
    x, residual, weight = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="x is torch.bfloat16 but residual is torch.float32"):
        ops.fused_add_rmsnorm(x, residual, weight, backend="ext")
    for got, want in zip(ops.fused_add_rmsnorm(x, residual, weight), fused_add_rmsnorm_ref(x, residual, weight)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
