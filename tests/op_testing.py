"""Helpers shared by the backbone-op tests (test_ops_rmsnorm.py, test_ops_swiglu.py, test_ops_rope.py).

The accuracy rule of docs/design.md §4: in fp32 a backend matches the fp64 reference tightly; in fp16/bf16
its error against the fp64 reference is at most 2x the error of eager PyTorch (the reference backend)
run in the same dtype, plus a floor of a few units in the last place of the output dtype.
"""
import os

import pytest
import torch


# The extension is built by `make venv`; only an explicit pure-Python install may skip its tests.
NO_EXT = os.environ.get("UNIGENDET_NO_EXT", "") not in ("", "0")
BACKENDS = ["reference", pytest.param("ext", marks=pytest.mark.skipif(NO_EXT, reason="UNIGENDET_NO_EXT is set"))]
EXT_ONLY = pytest.mark.skipif(NO_EXT, reason="UNIGENDET_NO_EXT is set")


def gpu_only(test):
    """Marks a test `gpu` and skips it without CUDA (each has a CPU test of the same logic)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


LOW_PRECISION = [torch.float16, torch.bfloat16]



def run_with_grads(fn, inputs: list, upstream: list):
    """(outputs, grads of the inputs that require grad) of sum(out * upstream)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outs, upstream) if u is not None)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, wrt))


def leaf(t: torch.Tensor, dtype=None, grad: bool = True) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(grad)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_2x_eager(got: list, eager: list, exact: list, dtype: torch.dtype, what: str):
    """Each tensor of `got` is at most 2x as far from `exact` as `eager` is, plus a few ulps of dtype."""
    for i, (g, e, x) in enumerate(zip(got, eager, exact)):
        floor = 4 * torch.finfo(dtype).eps * max(1.0, x.abs().max().item())
        err, ref_err = max_err(g, x), max_err(e, x)
        assert err <= 2 * ref_err + floor, f"{what}[{i}]: error {err:.3g} > 2 x eager {ref_err:.3g} + {floor:.3g}"


def assert_accurate(run, *args, candidate=None) -> list:
    """The docs/design.md §4 rule for one backend call `run(backend, *args, dtype=None)`: fp32 close to the
    fp64 reference, fp16/bf16 within 2x eager's error; the results are also run-to-run identical.
    `candidate(*args)` is what is checked (default: the "ext" backend). Returns its results."""
    candidate = candidate or (lambda *a: run("ext", *a))
    got, eager = candidate(*args), run("reference", *args)
    exact = run("exact", *args, torch.float64)
    dtype = got[0].dtype
    if dtype == torch.float32:
        for g, e in zip(got, exact):
            torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-4)
    else:
        assert_within_2x_eager(got, eager, exact, dtype, f"{got[0].device} {dtype}")
    assert all(torch.equal(a, b) for a, b in zip(got, candidate(*args)))  # deterministic
    return got
