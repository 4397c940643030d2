"""mmsa_attention with a key-only stream (q_* None, k_*, v_* given): the other stream's queries read
its keys, it has no query rows and outputs None. The model's last layer runs the stream whose output
it does not use this way. Reference semantics against the full two-stream call; the Triton kernels
(CPU interpreter without a GPU: small odd shapes) against the reference, forward and backward."""
import importlib.util

import pytest
import torch

from unigendet import ops
from unigendet.ops.reference import mmsa_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _inputs(B, Tg, Td, H, Hkv, D, dtype=torch.float32, seed=0, device="cpu"):
    """[q_g, k_g, v_g, q_d, k_d, v_d]: q (B, T, H, D), k and v (B, T, Hkv, D), leaves needing grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Tg, H, D), (B, Tg, Hkv, D), (B, Tg, Hkv, D), (B, Td, H, D), (B, Td, Hkv, D), (B, Td, Hkv, D)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _drop_queries(xs, key_only: str):
    """The six inputs with the key-only stream's q set to None."""
    xs = list(xs)
    xs[0 if key_only == "g" else 3] = None
    return xs


def _run(fn, inputs, key_only, kw, dtype=None, seed=1):
    """[o, lse (valid rows), grads of the five tensors that are given] of a loss on the query
    stream's o and lse; `key_only` ("g" or "d") names the stream called without queries."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in inputs]
    args = _drop_queries(xs, key_only)
    out = fn(*args, return_lse=True, **kw)
    q = "d" if key_only == "g" else "g"
    i = 0 if q == "g" else 1
    assert out[1 - i] is None and out[3 - i] is None  # the key-only stream has no output and no lse
    o, lse, lens = out[i], out[2 + i], kw.get(f"len_{q}")
    g = torch.Generator().manual_seed(seed)
    B, T, H, _ = o.shape
    w = torch.randn(o.shape, generator=g).to(o.device)
    wl = torch.randn(B, H, T, generator=g).to(o.device)
    valid = torch.ones(B, T, dtype=torch.bool, device=o.device) if lens is None else \
        torch.arange(T, device=o.device)[None] < lens.to(o.device)[:, None]  # (B, T)
    lse = torch.where(valid[:, None], lse, 0.0)
    ((o.float() * w).sum() + (lse * wl).sum()).backward()
    return [o.detach().float(), lse.detach()] + [_grad(x) for x in args if x is not None]


def _grad(x):
    """x.grad in fp32; zeros where nothing reached x (the reference builds no graph to an unread k, v)."""
    return torch.zeros(x.shape, device=x.device) if x.grad is None else x.grad.float()


# ----------------------------------------------------------------------------- reference semantics


@pytest.mark.parametrize("key_only", ["g", "d"])
@pytest.mark.parametrize("cross,own_causal,other_causal", [(True, False, False), (True, True, True),
                                                           (False, False, True)])
def test_reference_equals_full_call(key_only, cross, own_causal, other_causal):
    """Output and gradients equal those of the full two-stream call whose loss ignores the key-only
    stream's output (its k, v gradients then come from the other stream's queries alone)."""
    q = "d" if key_only == "g" else "g"
    kw = {f"{q}_causal": other_causal, f"{key_only}_causal": own_causal, "len_g": torch.tensor([11, 6]),
          "len_d": torch.tensor([9, 13]), "g2d": cross if q == "g" else True, "d2g": cross if q == "d" else True}
    inputs = _inputs(2, 11, 13, 4, 2, 8, dtype=torch.float64, seed=3)
    got = _run(mmsa_attention_ref, inputs, key_only, kw)

    xs = [x.detach().requires_grad_() for x in inputs]
    o_g, o_d, lse_g, lse_d = mmsa_attention_ref(*xs, return_lse=True, **kw)
    (o, lse) = (o_d, lse_d) if key_only == "g" else (o_g, lse_g)
    lens = kw[f"len_{q}"]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(o.shape, generator=g, dtype=torch.float32)
    wl = torch.randn(o.shape[0], o.shape[2], o.shape[1], generator=g, dtype=torch.float32)
    valid = torch.arange(o.shape[1])[None] < lens[:, None]
    lse = torch.where(valid[:, None], lse, 0.0)
    ((o.float() * w).sum() + (lse * wl).sum()).backward()
    skip = 0 if key_only == "g" else 3
    want = [o.detach().float(), lse.detach()] + [_grad(x) for j, x in enumerate(xs) if j != skip]
    assert len(got) == len(want) == 7
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    if not cross:  # the query stream does not read the key-only one: its k, v get zero gradient
        kv = got[5:7] if key_only == "d" else got[2:4]  # got: o, lse, then the grads in argument order
        assert all(torch.all(t == 0) for t in kv)


def test_reference_gradcheck_float64():
    xs = _inputs(1, 4, 5, 2, 1, 4, dtype=torch.float64, seed=5)
    q_g, k_g, v_g, _, k_d, v_d = xs
    fn = lambda a, b, c, d, e: ops.mmsa_attention(a, b, c, None, d, e, g_causal=True, len_d=torch.tensor([4]),  # noqa
                                                  backend="reference")[0]
    assert torch.autograd.gradcheck(fn, [q_g, k_g, v_g, k_d, v_d])


@pytest.mark.parametrize("bad", ["only_k", "only_v", "hkv", "head_dim", "batch", "dtype", "lens", "no_queries"])
def test_key_only_bad_inputs_raise(bad):
    q_g, k_g, v_g, _, k_d, v_d = _inputs(2, 5, 6, 4, 2, 8)
    kw = {}
    if bad == "only_k":
        v_d = None
    elif bad == "only_v":
        k_d = None
    elif bad == "hkv":
        k_d, v_d = k_d[:, :, :1], v_d[:, :, :1]
    elif bad == "head_dim":
        k_d, v_d = k_d[..., :4], v_d[..., :4]
    elif bad == "batch":
        k_d, v_d = k_d[:1], v_d[:1]
    elif bad == "dtype":
        k_d, v_d = k_d.double(), v_d.double()
    elif bad == "lens":
        kw = {"len_d": torch.tensor([7, 3])}  # Td = 6
    elif bad == "no_queries":
        q_g = None
    with pytest.raises(ValueError, match="mmsa_attention"):
        ops.mmsa_attention(q_g, k_g, v_g, None, k_d, v_d, **kw)


# ----------------------------------------------------------------------------- Triton backend


def _triton(*x, **kw):
    from unigendet.kernels.attention import mmsa_attention_triton

    return mmsa_attention_triton(*x, **kw)


@needs_triton
@pytest.mark.parametrize("key_only", ["g", "d"])
@pytest.mark.parametrize("cross,g_causal,d_causal", [(True, False, False), (True, True, True), (False, True, False)])
def test_triton_matches_reference_fp32(key_only, cross, g_causal, d_causal):
    """Odd lengths crossing full, diagonal and partial interpreter tiles; padding on both streams; GQA."""
    inputs = _inputs(2, 37, 21, 4, 2, 32, seed=11, device=DEV)
    kw = dict(g2d=cross, d2g=cross, g_causal=g_causal, d_causal=d_causal, len_g=torch.tensor([37, 20]),
              len_d=torch.tensor([13, 21]))
    got = _run(_triton, inputs, key_only, kw)
    want = _run(mmsa_attention_ref, inputs, key_only, kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    # through the dispatcher as well (backend="triton"), same numbers
    disp = _run(lambda *x, **k: ops.mmsa_attention(*x, backend="triton", **k), inputs, key_only, kw)
    for a, b in zip(disp, got):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_only", ["g", "d"])
def test_triton_low_precision_within_2x_eager(dtype, key_only):
    """flash-attention's rule: |kernel - ref| <= 2 |eager - ref| + 2 * (rounding of ref in dtype)."""
    inputs = _inputs(1, 19, 34, 2, 1, 64, dtype=dtype, seed=13, device=DEV)
    kw = dict(d_causal=True, len_g=torch.tensor([17]))
    got = _run(_triton, inputs, key_only, kw)
    eager = _run(mmsa_attention_ref, inputs, key_only, kw)
    ref = _run(mmsa_attention_ref, inputs, key_only, kw, dtype=torch.float32)
    for i, (a, e, r) in enumerate(zip(got, eager, ref)):
        err, err_eager = (a - r).abs().max().item(), (e - r).abs().max().item()
        floor = 2 * (r.to(dtype).float() - r).abs().max().item()
        assert err <= 2 * err_eager + floor, f"[{i}] {dtype}: error {err:.3g} > 2 x eager {err_eager:.3g} + {floor:.2g}"
