"""mmsa_attention, "sdpa" backend (PyTorch's fused CPU attention per stream block, merged by lse):
the docs/design.md §4 checks against the fp64 reference, forward and backward (through the lse too),
every switch, GQA, padding, key-only and absent streams, odd shapes, fp32 and bf16."""
import itertools

import pytest
import torch

from op_testing import NO_EXT, assert_within_2x_eager
from unigendet import backends, ops
from unigendet.ops.attention_cpu import mmsa_attention_sdpa
from unigendet.ops.reference import mmsa_attention_ref

SWITCHES = list(itertools.product([False, True], repeat=4))  # g2d, d2g, g_causal, d_causal


def _inputs(B, Tg, Td, H, Hkv, D, seed=0):
    """[q_g, k_g, v_g, q_d, k_d, v_d] in fp64: q (B, T, H, D), k and v (B, T, Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Tg, H, D), (B, Tg, Hkv, D), (B, Tg, Hkv, D), (B, Td, H, D), (B, Td, Hkv, D), (B, Td, Hkv, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _run(fn, inputs, kw, dtype, seed=1, drop=()):
    """[o_g, o_d, lse_g, lse_d, grads of the given inputs] of a random linear loss on o and lse (lse of
    padded rows excluded), inputs cast to `dtype`; `drop`: indices of inputs passed as None."""
    xs = [None if i in drop else x.detach().to(dtype).requires_grad_() for i, x in enumerate(inputs)]
    out = fn(*xs, return_lse=True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for i, t in enumerate(out):
        if t is None:
            continue
        w = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if i >= 2:  # lse (B, H, T): padded query rows are not part of the contract
            lens = kw.get("len_g" if i == 2 else "len_d")
            if lens is not None:
                w = w * (torch.arange(t.shape[-1])[None, :] < lens[:, None])[:, None, :]
        loss = loss + (t.double() * w).sum()
    given = [x for x in xs if x is not None]
    grads = torch.autograd.grad(loss, given)
    return [t.detach() for t in out if t is not None] + list(grads)


def _check_fp32(kw, inputs, drop=()):
    got = _run(mmsa_attention_sdpa, inputs, kw, torch.float32, drop=drop)
    exact = _run(mmsa_attention_ref, inputs, kw, torch.float64, drop=drop)
    assert len(got) == len(exact)
    for i, (a, b) in enumerate(zip(got, exact)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m, i=i: f"result {i}: {m}")


@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal", SWITCHES)
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_fp64_exact_all_switches_gqa_padding(g2d, d2g, g_causal, d_causal, Hkv):
    inputs = _inputs(2, 13, 17, 4, Hkv, 8, seed=Hkv)
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal,
              len_g=torch.tensor([13, 7]), len_d=torch.tensor([11, 17]))
    got = _run(mmsa_attention_sdpa, inputs, kw, torch.float64)
    exact = _run(mmsa_attention_ref, inputs, kw, torch.float64)
    for i, (a, b) in enumerate(zip(got, exact)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m, i=i: f"result {i}: {m}")


SHAPES = [(1, 1, 1, 1, 1, 4), (3, 5, 2, 2, 1, 5), (2, 33, 65, 6, 3, 24), (1, 70, 9, 2, 2, 48)]  # B Tg Td H Hkv D


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("switches", [(True, True, False, False), (True, False, True, True),
                                      (False, True, True, False)])
def test_fp32_odd_shapes(shape, switches):
    B, Tg, Td, H, Hkv, D = shape
    g2d, d2g, g_causal, d_causal = switches
    len_d = torch.tensor([max(1, Td - b) for b in range(B)])
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_d=len_d, scale=0.3)
    _check_fp32(kw, _inputs(*shape, seed=sum(shape)))


@pytest.mark.parametrize("key_only", ["g", "d"])
def test_key_only_and_absent_streams(key_only):
    inputs = _inputs(2, 9, 6, 4, 2, 8, seed=3)
    kw = dict(len_g=torch.tensor([9, 4]), len_d=torch.tensor([6, 2]), g_causal=True)
    q = 0 if key_only == "g" else 3
    _check_fp32(kw, inputs, drop=(q,))  # key-only: the other stream reads its keys
    _check_fp32(kw, inputs, drop=(q, q + 1, q + 2))  # absent: plain self-attention of the other


@pytest.mark.parametrize("switches", [(True, True, False, False), (True, True, True, True), (False, True, False, True)])
def test_bf16_within_2x_eager(switches):
    check_bf16_within_2x_eager(mmsa_attention_sdpa, switches, head_dim=32, label="sdpa bf16")


def check_bf16_within_2x_eager(fn, switches, head_dim: int, label: str):
    """A CPU backend's bf16 outputs, lse and gradients are within twice the eager bf16 reference's error
    (against fp64), with a padded G stream; o comes back in q's dtype, lse in fp32."""
    g2d, d2g, g_causal, d_causal = switches
    inputs = _inputs(2, 37, 21, 4, 2, head_dim, seed=5)
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=torch.tensor([37, 20]))
    got = _run(fn, inputs, kw, torch.bfloat16)
    eager = _run(mmsa_attention_ref, inputs, kw, torch.bfloat16)
    exact = _run(mmsa_attention_ref, inputs, kw, torch.float64)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_within_2x_eager(got, eager, exact, torch.bfloat16, label)


def test_gradcheck_float64():
    inputs = [x.requires_grad_() for x in _inputs(1, 3, 4, 2, 1, 4, seed=6)]
    fn = lambda *x: mmsa_attention_sdpa(*x, d_causal=True, len_d=torch.tensor([3]), return_lse=True)[:3]  # noqa
    assert torch.autograd.gradcheck(fn, inputs)


def test_padded_rows_zero_and_deterministic():
    inputs = [x.float() for x in _inputs(2, 10, 8, 2, 2, 8, seed=7)]
    kw = dict(len_g=torch.tensor([10, 4]), len_d=torch.tensor([3, 8]))
    o_g, o_d = mmsa_attention_sdpa(*inputs, **kw)
    assert torch.all(o_g[1, 4:] == 0) and torch.all(o_d[0, 3:] == 0)
    a = _run(mmsa_attention_sdpa, inputs, kw, torch.float32)
    b = _run(mmsa_attention_sdpa, inputs, kw, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_backend_selection():
    """auto picks "sdpa" for CPU inputs (before the reference) where the extension's CPU kernels ("ext") are not
    built; it refuses other devices with a reason."""
    x = [t.float() for t in _inputs(1, 4, 4, 2, 2, 8)]
    assert backends.select("mmsa_attention", "auto", *x).__name__ == ("mmsa_attention_sdpa" if NO_EXT
                                                                       else "mmsa_attention_ext")
    o = ops.mmsa_attention(*x, backend="sdpa")
    torch.testing.assert_close(o[0], mmsa_attention_ref(*x)[0])
    meta = [t.to("meta") for t in x]
    with pytest.raises(ops.BackendError, match="CPU tensors only"):
        backends.select("mmsa_attention", "sdpa", *meta)
    assert backends.BACKEND_NAMES.index("sdpa") < backends.BACKEND_NAMES.index("reference")


@pytest.mark.parametrize("g2d,d2g", [(False, True), (True, False), (False, False)])
def test_a_stream_that_does_not_read_the_other_does_not_depend_on_it(g2d, d2g):
    """As in the reference: with a switch off, the reading stream's output has no autograd path to the
    other stream's keys and values (None gradients, not zeros)."""
    x = [t.float().requires_grad_() for t in _inputs(2, 5, 6, 2, 1, 8, seed=9)]
    o_g, o_d = mmsa_attention_sdpa(*x, g2d=g2d, d2g=d2g)
    for out, other_kv, reads in ((o_g, x[4:6], g2d), (o_d, x[1:3], d2g)):
        grads = torch.autograd.grad(out.sum(), other_kv, retain_graph=True, allow_unused=True)
        assert all((g is not None) == reads for g in grads)
