"""mmsa_attention (reference backend): the semantics of DESIGN.md section 3 against the dense-mask
formulation (concatenated streams + SDPA, as the published code computes it) and direct checks."""
import itertools

import pytest
import torch

from unigendet import ops
from unigendet.ops.reference import mmsa_attention_dense, mmsa_attention_ref, mmsa_dense_mask

SWITCHES = list(itertools.product([False, True], repeat=4))  # g2d, d2g, g_causal, d_causal


def make_qkv(B, T, H, Hkv, D, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal", SWITCHES)
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_matches_dense_mask_all_switches(g2d, d2g, g_causal, d_causal, Hkv):
    B, Tg, Td, H, D = 2, 13, 17, 4, 8
    qkv_g, qkv_d = make_qkv(B, Tg, H, Hkv, D, seed=1), make_qkv(B, Td, H, Hkv, D, seed=2)
    len_g, len_d = torch.tensor([13, 7]), torch.tensor([11, 17])
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=len_g, len_d=len_d)
    o_g, o_d = ops.mmsa_attention(*qkv_g, *qkv_d, backend="reference", **kw)
    r_g, r_d = mmsa_attention_dense(*qkv_g, *qkv_d, **kw)
    torch.testing.assert_close(o_g, r_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_d, r_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g2d,d2g", [(True, True), (False, True), (False, False)])
def test_gradients_match_dense(g2d, d2g):
    B, Tg, Td, H, Hkv, D = 2, 9, 6, 4, 2, 8
    qkv_g = make_qkv(B, Tg, H, Hkv, D, dtype=torch.float64, seed=3, requires_grad=True)
    qkv_d = make_qkv(B, Td, H, Hkv, D, dtype=torch.float64, seed=4, requires_grad=True)
    kw = dict(g2d=g2d, d2g=d2g, g_causal=True, len_g=torch.tensor([9, 5]), len_d=torch.tensor([6, 3]))
    w = torch.randn(B, Tg + Td, H, D, dtype=torch.float64)
    grads = []
    for fn in (mmsa_attention_ref, mmsa_attention_dense):
        o_g, o_d = fn(*qkv_g, *qkv_d, **kw)
        (torch.cat([o_g, o_d], 1) * w).sum().backward()
        grads.append([x.grad.clone() for x in qkv_g + qkv_d])
        for x in qkv_g + qkv_d:
            x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    B, Tg, Td, H, Hkv, D = 1, 3, 4, 2, 1, 4
    inputs = make_qkv(B, Tg, H, Hkv, D, torch.float64, 5, True) + make_qkv(B, Td, H, Hkv, D, torch.float64, 6, True)
    fn = lambda *x: ops.mmsa_attention(*x, d_causal=True, len_d=torch.tensor([3]), backend="reference")  # noqa
    assert torch.autograd.gradcheck(fn, inputs)


def test_padded_query_rows_are_zero_and_padded_keys_unread():
    B, T, H, D = 2, 10, 2, 8
    qkv_g, qkv_d = make_qkv(B, T, H, H, D, seed=7), make_qkv(B, T, H, H, D, seed=8)
    len_g = torch.tensor([10, 4])
    o_g, o_d = mmsa_attention_ref(*qkv_g, *qkv_d, len_g=len_g)
    assert torch.all(o_g[1, 4:] == 0)
    # changing padded G keys/values of sample 1 changes nothing anywhere
    k2, v2 = qkv_g[1].clone(), qkv_g[2].clone()
    k2[1, 4:] += 100.0
    v2[1, 4:] -= 50.0
    o_g2, o_d2 = mmsa_attention_ref(qkv_g[0], k2, v2, *qkv_d, len_g=len_g)
    torch.testing.assert_close(o_g, o_g2)
    torch.testing.assert_close(o_d, o_d2)


def test_no_cross_stream_flow_when_switched_off():
    """With g2d = False, G outputs do not depend on the D stream at all (and vice versa)."""
    B, T, H, D = 1, 6, 2, 8
    qkv_g, qkv_d = make_qkv(B, T, H, H, D, seed=9), make_qkv(B, T, H, H, D, seed=10)
    other = make_qkv(B, T, H, H, D, seed=11)
    a, _ = mmsa_attention_ref(*qkv_g, *qkv_d, g2d=False, d2g=True)
    b, _ = mmsa_attention_ref(*qkv_g, *other, g2d=False, d2g=True)
    torch.testing.assert_close(a, b)
    _, c = mmsa_attention_ref(*qkv_g, *qkv_d, g2d=True, d2g=False)
    _, d = mmsa_attention_ref(*other, *qkv_d, g2d=True, d2g=False)
    torch.testing.assert_close(c, d)


def test_absent_stream_is_plain_self_attention():
    B, T, H, Hkv, D = 2, 7, 4, 2, 8
    q, k, v = make_qkv(B, T, H, Hkv, D, seed=12)
    o_g, o_d = ops.mmsa_attention(q, k, v, None, None, None, g_causal=True)
    assert o_d is None
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        is_causal=True).transpose(1, 2)
    torch.testing.assert_close(o_g, ref, atol=1e-5, rtol=1e-5)
    o_g, o_d = ops.mmsa_attention(None, None, None, q, k, v)
    assert o_g is None and o_d.shape == q.shape


def test_lse_and_dtype_and_scale():
    qkv_g, qkv_d = make_qkv(1, 5, 2, 2, 8, seed=13), make_qkv(1, 6, 2, 2, 8, seed=14)
    o_g, o_d, lse_g, lse_d = mmsa_attention_ref(*qkv_g, *qkv_d, return_lse=True, scale=0.3)
    q, kg, kd = qkv_g[0], qkv_g[1], qkv_d[1]
    s = torch.cat([torch.einsum("bqhd,bkhd->bhqk", q, kg), torch.einsum("bqhd,bkhd->bhqk", q, kd)], -1) * 0.3
    torch.testing.assert_close(lse_g, torch.logsumexp(s, -1))
    half = [x.half() for x in qkv_g + qkv_d]
    h_g, h_d = mmsa_attention_ref(*half)
    assert h_g.dtype == torch.float16 and h_d.dtype == torch.float16


def test_dense_mask_matches_the_table():
    m = mmsa_dense_mask(2, 3, g2d=False, d2g=True, g_causal=True, d_causal=False)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],   # G0: causal G, no D
        [1, 1, 0, 0, 0],   # G1
        [1, 1, 1, 1, 1],   # D rows: all G (d2g), all D (full)
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


@pytest.mark.parametrize("bad", ["hkv", "dtype", "lens", "both_none", "missing_kv"])
def test_bad_inputs_raise_clear_errors(bad):
    qkv_g, qkv_d = make_qkv(1, 5, 4, 2, 8), make_qkv(1, 6, 4, 2, 8)
    kw = {}
    if bad == "hkv":
        qkv_d = make_qkv(1, 6, 4, 3, 8)
    elif bad == "dtype":
        qkv_d = [x.double() for x in qkv_d]
    elif bad == "lens":
        kw = {"len_g": torch.tensor([9])}
    elif bad == "both_none":
        qkv_g = qkv_d = [None, None, None]
    elif bad == "missing_kv":
        qkv_g = [qkv_g[0], None, None]
    with pytest.raises(ValueError, match="mmsa_attention"):
        ops.mmsa_attention(*qkv_g, *qkv_d, **kw)
