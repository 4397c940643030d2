"""pytest-benchmark wrappers of the CPU micro-benchmarks (not part of the normal test run, whose
testpaths are tests/):

    pytest bench/ --benchmark-only                      # ext vs eager for each backbone op, fp32
    pytest bench/ --benchmark-only --benchmark-compare   # against a saved run (--benchmark-autosave)

Shapes are moderate (N=2048 rows) so that a run takes about a minute on 2 cores; the full tables with
torch.compile and GB/s come from `python -m bench.bench_{rmsnorm,swiglu,rope}` or `unigendet bench`.
"""
import pytest
import torch

from unigendet.ops.reference import fused_add_rmsnorm_ref, qk_rmsnorm_rope_ref, swiglu_ref
from unigendet.ops.rmsnorm import fused_add_rmsnorm_ext
from unigendet.ops.rope import qk_rmsnorm_rope_ext
from unigendet.ops.swiglu import swiglu_ext

N, C = 2048, 1024


def _norm_inputs():
    return torch.randn(N, C), torch.randn(N, C), torch.randn(C), 1e-6


def _swiglu_inputs():
    return (torch.randn(N, 2 * C),)


def _rope_inputs():
    qkv = torch.randn(2, 512, 24 * 64)
    q, k = qkv[..., :16 * 64].view(2, 512, 16, 64), qkv[..., 16 * 64:20 * 64].view(2, 512, 4, 64)
    ang = torch.rand(512, 32)
    return q, k, torch.ones(64), torch.ones(64), ang.cos(), ang.sin(), 1e-6


CASES = {
    "fused_add_rmsnorm": (_norm_inputs, fused_add_rmsnorm_ref, fused_add_rmsnorm_ext),
    "swiglu": (_swiglu_inputs, swiglu_ref, swiglu_ext),
    "qk_rmsnorm_rope": (_rope_inputs, qk_rmsnorm_rope_ref, qk_rmsnorm_rope_ext),
}


@pytest.mark.parametrize("provider", ["eager", "ext"])
@pytest.mark.parametrize("op", list(CASES))
def test_forward(benchmark, op, provider):
    make, ref, ext = CASES[op]
    inputs = make()
    benchmark.group = f"{op} forward (fp32, CPU)"
    benchmark(ref if provider == "eager" else ext, *inputs)
