"""mmsa_attention (reference backend): the semantics of docs/design.md §3 against the dense-mask
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


# ============================================================================= Triton backend
# Runs the kernels of kernels/attention.py on the Triton CPU interpreter (conftest sets
# TRITON_INTERPRET=1); shapes are tiny and odd so every test crosses full, diagonal and partial
# blocks (interpreter tiles: kernels.attention.INTERPRET_BLOCKS). Where a CUDA device is present the
# same tests run the compiled kernels on CUDA tensors (inputs on DEV: the compiled backend refuses
# CPU tensors). GPU-only checks (realistic shapes) are marked `gpu`.
import importlib.util  # noqa: E402
import warnings  # noqa: E402

from unigendet import backends  # noqa: E402
from op_testing import NO_EXT  # noqa: E402
from unigendet.ops.attention_cpu import mmsa_attention_sdpa  # noqa: E402
from unigendet.ops.attention_ext import mmsa_attention_ext  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5)}  # fp16/bf16: the 2x-eager rule in `_assert_lowp`
SHAPE = dict(B=2, Tg=37, Td=50, H=4, D=32)
LENS = (torch.tensor([37, 20]), torch.tensor([33, 50]))  # sample 0 of G and sample 1 of D unpadded


def _inputs(B, Tg, Td, H, Hkv, D, dtype=torch.float32, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Tg, H, D), (B, Tg, Hkv, D), (B, Tg, Hkv, D), (B, Td, H, D), (B, Td, Hkv, D), (B, Td, Hkv, D)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _run(fn, inputs, kw, dtype=None, seed=1):
    """Outputs, lse and gradients of a loss touching o_g, o_d and the lse of valid rows.
    dtype: cast the inputs first (e.g. fp32 for the reference of a bf16 run)."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in inputs]
    o_g, o_d, lse_g, lse_d = fn(*xs, return_lse=True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for o, lse, lens in ((o_g, lse_g, kw.get("len_g")), (o_d, lse_d, kw.get("len_d"))):
        B, T, H, _ = o.shape
        w = torch.randn(o.shape, generator=g).to(o.device)
        wl = torch.randn(B, H, T, generator=g).to(o.device)
        valid = torch.ones(B, T, dtype=torch.bool, device=o.device) if lens is None else \
            torch.arange(T, device=o.device)[None] < lens.to(o.device)[:, None]
        loss = loss + (o.float() * w).sum() + torch.where(valid[:, None], lse * wl, 0.0).sum()
    loss.backward()
    row = lambda lse, lens: lse if lens is None else torch.where(  # noqa: E731
        torch.arange(lse.shape[-1], device=lse.device)[None, None] < lens.to(lse.device)[:, None, None], lse, 0.0)
    return [o_g.float(), o_d.float(), row(lse_g, kw.get("len_g")), row(lse_d, kw.get("len_d"))] + \
        [x.grad.float() for x in xs]


NAMES = ["o_g", "o_d", "lse_g", "lse_d", "dq_g", "dk_g", "dv_g", "dq_d", "dk_d", "dv_d"]


def _triton_lse(*x, **kw):
    from unigendet.kernels.attention import mmsa_attention_triton

    return mmsa_attention_triton(*x, **kw)


def _assert_close_all(got, want, **tol):
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@needs_triton
@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal", SWITCHES)
def test_triton_matches_reference_all_switches(g2d, d2g, g_causal, d_causal):
    """fp32, forward + backward (dq, dk, dv, through o and lse), padding, GQA H/Hkv = 2."""
    inputs = _inputs(SHAPE["B"], SHAPE["Tg"], SHAPE["Td"], 2, 1, SHAPE["D"], seed=21)
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=LENS[0], len_d=LENS[1])
    _assert_close_all(_run(_triton_lse, inputs, kw), _run(mmsa_attention_ref, inputs, kw), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("Hkv,D,switches", [(4, 64, (True, True, False, False)), (2, 32, (False, True, True, False)),
                                            (1, 64, (True, False, False, True)), (1, 96, (True, True, True, False))])
def test_triton_gqa_and_head_dims(Hkv, D, switches):
    """Hkv = H, H/2, 1 (K/V never repeated in memory) and head dims 32, 64, 96 (padded to 128)."""
    g2d, d2g, g_causal, d_causal = switches
    inputs = _inputs(1, 21, 34, 4, Hkv, D, seed=Hkv + D)
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_d=torch.tensor([29]))
    _assert_close_all(_run(_triton_lse, inputs, kw), _run(mmsa_attention_ref, inputs, kw), **TOL[torch.float32])


def _assert_lowp(got, eager, ref, dtype):
    """flash-attention's rule: |kernel - ref| <= 2 |eager - ref| + 2 * (rounding of ref in dtype)."""
    for name, a, e, r in zip(NAMES, got, eager, ref):
        err, err_eager = (a - r).abs().max().item(), (e - r).abs().max().item()
        floor = 2 * (r.to(dtype).float() - r).abs().max().item()
        assert err <= 2 * err_eager + floor, f"{name}: kernel error {err:.3g} > 2 x eager {err_eager:.3g} + {floor:.2g}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("switches", [(True, True, False, False), (False, True, True, False)])
def test_triton_low_precision_within_2x_eager(dtype, switches):
    g2d, d2g, g_causal, d_causal = switches
    inputs = _inputs(2, 37, 20, 4, 2, 64, dtype=dtype, seed=31)
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=torch.tensor([37, 30]))
    got = _run(_triton_lse, inputs, kw)
    eager = _run(mmsa_attention_ref, inputs, kw)  # eager PyTorch in the same dtype
    ref = _run(mmsa_attention_ref, inputs, kw, dtype=torch.float32)
    _assert_lowp(got, eager, ref, dtype)


def _flex_mmsa(inputs, g2d, d2g, g_causal, d_causal, len_g, len_d):
    """FlexAttention on the concatenated streams with the MMSA mask_mod (independent implementation)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_g, k_g, v_g, q_d, k_d, v_d = [x.detach() for x in inputs]
    B, Tg, H, D = q_g.shape
    Td = q_d.shape[1]
    lg, ld = len_g.to(q_g.device), len_d.to(q_g.device)  # indexed with the mask's (device) indices

    def mask_mod(b, h, qi, ki):
        q_is_g, k_is_g = qi < Tg, ki < Tg
        qp, kp = torch.where(q_is_g, qi, qi - Tg), torch.where(k_is_g, ki, ki - Tg)
        causal = torch.where(q_is_g, g_causal, d_causal)
        allowed = torch.where(q_is_g == k_is_g, ~(causal & (kp > qp)), torch.where(q_is_g, g2d, d2g))
        return allowed & (kp < torch.where(k_is_g, lg[b], ld[b]))

    T = Tg + Td
    mask = create_block_mask(mask_mod, B, None, T, T, device=q_g.device)
    cat = lambda a, b: torch.cat([a, b], 1).transpose(1, 2)  # noqa: E731  (B, H, T, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile" on CPU
        o = flex_attention(cat(q_g, q_d), cat(k_g, k_d), cat(v_g, v_d), block_mask=mask, enable_gqa=True)
    o = o.transpose(1, 2)
    rows = torch.cat([torch.arange(Tg)[None] < len_g[:, None], torch.arange(Td)[None] < len_d[:, None]], 1)
    o = o * rows.to(o.device)[:, :, None, None]
    return o[:, :Tg], o[:, Tg:]


@needs_triton
@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal", [(True, True, False, False), (False, True, True, False),
                                                       (True, False, False, True), (False, False, True, True)])
def test_triton_matches_flex_attention(g2d, d2g, g_causal, d_causal):
    """Forward against torch's FlexAttention (CPU has no FlexAttention backward; gradients are
    checked against the dense-mask SDPA formulation in the next test)."""
    inputs = _inputs(2, 23, 30, 4, 2, 32, seed=41)
    len_g, len_d = torch.tensor([23, 9]), torch.tensor([17, 30])
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=len_g, len_d=len_d)
    o_g, o_d = ops.mmsa_attention(*inputs, backend="triton", **kw)
    f_g, f_d = _flex_mmsa(inputs, **kw)
    torch.testing.assert_close(o_g, f_g, **TOL[torch.float32])
    torch.testing.assert_close(o_d, f_d, **TOL[torch.float32])


@needs_triton
def test_triton_gradients_match_dense_sdpa():
    inputs = _inputs(2, 19, 26, 4, 1, 32, seed=51)
    kw = dict(g2d=True, d2g=True, d_causal=True, len_g=torch.tensor([19, 11]), len_d=torch.tensor([26, 20]))
    w = torch.randn(2, 45, 4, 32).to(DEV)
    grads = []
    for fn in (lambda *x, **k: ops.mmsa_attention(*x, backend="triton", **k), mmsa_attention_dense):
        xs = [x.detach().requires_grad_() for x in inputs]
        o_g, o_d = fn(*xs, **kw)
        (torch.cat([o_g, o_d], 1) * w).sum().backward()
        grads.append([x.grad for x in xs])
    _assert_close_all(*grads, **TOL[torch.float32])


@needs_triton
def test_triton_padding_absent_stream_and_views():
    B, T, H, Hkv, D = 2, 19, 4, 2, 32
    # model layout: q, k, v split from one fused projection, then .view -> non-contiguous views
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D).to(DEV)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    assert not q.is_contiguous()
    len_g = torch.tensor([19, 6])
    o_g, o_d = ops.mmsa_attention(q, k, v, q, k, v, d_causal=True, len_g=len_g, backend="triton")
    r_g, r_d = mmsa_attention_ref(q, k, v, q, k, v, d_causal=True, len_g=len_g)
    torch.testing.assert_close(o_g, r_g, **TOL[torch.float32])
    torch.testing.assert_close(o_d, r_d, **TOL[torch.float32])
    assert torch.all(o_g[1, 6:] == 0)
    # padded G keys/values are never read; their gradients are zero; padded rows have lse = +inf
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    with torch.no_grad():
        k2[1, 6:] += 100.0
        v2[1, 6:] -= 50.0
    from unigendet.kernels.attention import mmsa_attention_triton

    a_g, a_d, lse_g, _ = mmsa_attention_triton(q, k2, v2, q, k, v, d_causal=True, len_g=len_g, return_lse=True)
    torch.testing.assert_close(a_g, o_g)
    torch.testing.assert_close(a_d, o_d)
    assert torch.all(lse_g[1, :, 6:] == float("inf")) and torch.isfinite(lse_g[0]).all()
    (a_g.sum() + a_d.sum()).backward()
    assert torch.all(k2.grad[1, 6:] == 0) and torch.all(v2.grad[1, 6:] == 0)
    # an absent stream: plain (causal) self-attention, None in its place
    o_g, o_d = ops.mmsa_attention(q, k, v, None, None, None, g_causal=True, backend="triton")
    assert o_d is None
    torch.testing.assert_close(o_g, mmsa_attention_ref(q, k, v, None, None, None, g_causal=True)[0],
                               **TOL[torch.float32])
    o_g, o_d = ops.mmsa_attention(None, None, None, q, k, v, scale=0.2, backend="triton")
    assert o_g is None
    torch.testing.assert_close(o_d, mmsa_attention_ref(None, None, None, q, k, v, scale=0.2)[1], **TOL[torch.float32])


@needs_triton
def test_triton_backward_is_deterministic():
    from unigendet.kernels.attention import mmsa_attention_triton

    inputs = _inputs(1, 21, 17, 4, 1, 32, seed=61)
    runs = []
    for _ in range(2):
        xs = [x.detach().requires_grad_() for x in inputs]
        o_g, o_d = mmsa_attention_triton(*xs, g_causal=True, deterministic=True)
        (o_g.square().sum() + o_d.sum()).backward()
        runs.append([x.grad for x in xs])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_triton
def test_triton_backend_selection():
    from unigendet.ops import attention as attn_mod

    q, k, v = [x.to(DEV) for x in make_qkv(1, 5, 2, 1, 16)]
    if DEV == "cpu":  # auto never picks the interpreter (but a fused CPU one); backend="triton" opts in
        cpu_impl = mmsa_attention_sdpa if NO_EXT else mmsa_attention_ext
        assert backends.select("mmsa_attention", "auto", q, k, v, None, None, None) is cpu_impl
    else:  # compiled kernels on CUDA tensors: auto takes them
        assert backends.select("mmsa_attention", "auto", q, k, v, None, None, None) is attn_mod._triton_impl
    assert backends.select("mmsa_attention", "triton", q, k, v, None, None, None) is attn_mod._triton_impl
    assert ops.available_backends()["mmsa_attention"] == ["triton"] + ["ext"] * (not NO_EXT) + ["sdpa", "reference"]
    with pytest.raises(ops.BackendError, match="head dim 8"):
        ops.mmsa_attention(*[x.to(DEV) for x in make_qkv(1, 5, 2, 1, 8)], None, None, None, backend="triton")
    with pytest.raises(ops.BackendError, match="dtype torch.float64"):
        ops.mmsa_attention(*[x.double() for x in (q, k, v)], None, None, None, backend="triton")


@needs_triton
def test_triton_op_registration_and_compile():
    """The op is a torch.library custom op with fake and autograd registrations, so torch.compile
    traces through it without graph breaks (aot_eager keeps the check fast on the interpreter)."""
    from unigendet.kernels import attention as K

    inputs = _inputs(1, 9, 7, 2, 1, 16, seed=71)
    lens = [torch.tensor([9], dtype=torch.int32, device=DEV), torch.tensor([5], dtype=torch.int32, device=DEV)]
    torch.library.opcheck(K.mmsa_attention_fwd, (*inputs, *lens, True, True, False, True, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def f(*x):
        o_g, o_d = ops.mmsa_attention(*x, d_causal=True, len_d=torch.tensor([5]), backend="triton")
        return o_g.sin().sum() + o_d.cos().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g_c = torch.autograd.grad(compiled(*inputs), inputs)
    g_e = torch.autograd.grad(f(*inputs), inputs)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def _eager_lowp(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d, d2g, g_causal=False, d_causal=False, len_g=None,
                len_d=None, return_lse=True):
    """Plain eager attention kept in the low dtype (matmuls in bf16/fp16, softmax in fp32, P rounded),
    flash-attention's `attention_ref(upcast=False)`: the "eager in the same dtype" of its 2x rule."""
    B, Tg, H, D = q_g.shape
    Td = q_d.shape[1]
    mask = mmsa_dense_mask(Tg, Td, g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=len_g,
                           len_d=len_d, batch=B, device=q_g.device)  # (B, 1, T, T)
    rep = lambda x: torch.cat(x, 1).transpose(1, 2).repeat_interleave(H // x[0].shape[2], 1)  # noqa: E731
    q, k, v = torch.cat([q_g, q_d], 1).transpose(1, 2), rep([k_g, k_d]), rep([v_g, v_d])  # (B, H, T, D)
    s = (q @ k.transpose(-1, -2) * D ** -0.5).float().masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, H, T)
    o = (torch.softmax(s, -1).to(q.dtype) @ v).transpose(1, 2)  # (B, T, H, D)
    lg = torch.full((B,), Tg) if len_g is None else len_g
    ld = torch.full((B,), Td) if len_d is None else len_d
    rows = torch.cat([torch.arange(Tg)[None] < lg[:, None], torch.arange(Td)[None] < ld[:, None]], 1)
    o = o * rows.to(o.device)[:, :, None, None]
    return o[:, :Tg], o[:, Tg:], lse[..., :Tg], lse[..., Tg:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gpu_within_2x_eager(dtype):
    """On the GPU (compiled kernels, 16-bit tensor-core dots, P rounded to the input dtype as in
    FlashAttention): odd lengths, padding, GQA, D = 128, both layouts and a causal stream."""
    for g2d, d2g, g_causal in ((True, True, False), (False, True, False), (True, True, True)):
        inputs = _inputs(2, 301, 517, 8, 2, 128, dtype=dtype, seed=81, device="cuda")
        kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, len_g=torch.tensor([301, 200]),
                  len_d=torch.tensor([517, 400]))
        got = _run(_triton_lse, inputs, kw)
        eager = _run(_eager_lowp, inputs, kw)
        ref = _run(mmsa_attention_ref, inputs, kw, dtype=torch.float32)
        _assert_lowp(got, eager, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_gpu_fp32_and_head_dims():
    for D in (64, 96):  # fp32 (IEEE dots) kernels compile slowly: two head dims (D = 128 is above in 16-bit)
        inputs = _inputs(1, 130, 67, 4, 1, D, seed=D, device="cuda")
        kw = dict(g2d=True, d2g=False, d_causal=True, len_d=torch.tensor([50]))
        _assert_close_all(_run(_triton_lse, inputs, kw), _run(mmsa_attention_ref, inputs, kw), atol=1e-4, rtol=1e-4)
