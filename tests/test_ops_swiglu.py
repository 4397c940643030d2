"""swiglu on every backend: semantics, dtypes, gradients, extreme inputs, the ext op's registrations."""
import pytest
import torch
import torch.nn.functional as F

from op_testing import (BACKENDS, EXT_ONLY, LOW_PRECISION, assert_accurate, assert_within_2x_eager, gpu_only,
                        leaf, run_with_grads)
from unigendet import ops
from unigendet.ops.reference import swiglu_ref

SHAPES = [(33, 2 * 45), (2, 3, 2 * 64), (1, 2), (7, 2 * 1031)]


def make_inputs(shape, dtype, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
    upstream = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(device=device, dtype=dtype)
    return gate_up, upstream


def run(backend, gate_up, upstream, dtype=None):
    fn = swiglu_ref if backend == "exact" else (lambda gu: ops.swiglu(gu, backend=backend))
    outs, grads = run_with_grads(fn, [leaf(gate_up, dtype)], [upstream])
    return outs + grads


def test_formula():
    gu = torch.randn(33, 90, dtype=torch.float64)
    torch.testing.assert_close(ops.swiglu(gu), F.silu(gu[:, :45]) * gu[:, 45:])
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_fp64_forward_and_backward(backend, shape):
    gate_up, upstream = make_inputs(shape, torch.float32, seed=len(shape))
    got, exact = run(backend, gate_up, upstream), run("exact", gate_up, upstream, torch.float64)
    assert got[0].shape == (*shape[:-1], shape[-1] // 2)
    for g, e in zip(got, exact):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_2x_eager(backend, dtype):
    gate_up, upstream = make_inputs((37, 2 * 129), dtype, seed=3, scale=3.0)
    got, eager = run(backend, gate_up, upstream), run("reference", gate_up, upstream)
    assert all(t.dtype == dtype for t in got)
    assert_within_2x_eager(got, eager, run("exact", gate_up, upstream, torch.float64), dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_inputs_stay_finite(backend):
    gate_up = torch.tensor([[-100.0, 100.0, -30.0, 0.0, 1.0, 1.0, 2.0, -1.0]])
    got, exact = run(backend, gate_up, torch.ones(1, 4)), run("exact", gate_up, torch.ones(1, 4), torch.float64)
    assert all(torch.isfinite(t).all() for t in got)
    for g, e in zip(got, exact):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    gu = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.swiglu(t, backend=backend), (gu,))


@EXT_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    gate_up, upstream = make_inputs((5, 2 * 33), dtype, seed=4)
    torch.library.opcheck(torch.ops.unigendet.swiglu, (gate_up.requires_grad_(),))
    torch.library.opcheck(torch.ops.unigendet.swiglu_backward, (upstream, gate_up.detach()))


@EXT_ONLY
def test_ext_rejects_odd_width_with_the_op_name():
    with pytest.raises(RuntimeError, match="unigendet::swiglu: the last dimension must be even"):
        torch.ops.unigendet.swiglu(torch.randn(3, 5))


@EXT_ONLY
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_ext_meets_the_accuracy_rule_on_cpu(dtype):
    """The rule the CUDA test below applies, here on the CPU kernels (same helper)."""
    assert_accurate(run, *make_inputs((33, 2 * 70), dtype, seed=7, scale=3.0))


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("shape", [(33, 2 * 45), (300, 2 * 4096), (64, 2 * 1027)])
@gpu_only
def test_cuda_within_2x_eager(dtype, shape):
    gate_up, upstream = make_inputs(shape, dtype, seed=6, device="cuda", scale=3.0)
    assert_accurate(run, gate_up, upstream)
    # a contiguous view that starts one row in is misaligned for 16-byte vectors unless rows are
    # a multiple of 16 bytes: the scalar path must give the same numbers
    view = torch.cat([gate_up[:1, :2].flatten(), gate_up.flatten()])[2:].view(shape)
    assert view.data_ptr() % 16 != 0
    torch.testing.assert_close(ops.swiglu(view, backend="ext"), ops.swiglu(gate_up, backend="ext"), atol=0, rtol=0)
