"""mmsa_consistency_loss (L_MMSA): the reference against a brute-force dense softmax, the Triton
kernels (CPU interpreter; compiled where a GPU is present) against the reference, forward and
backward, and the lse output of mmsa_attention that the loss reads.

Interpreter shapes are small and odd (each call runs its programs one by one in NumPy); the tiles
(kernels.consistency.INTERPRET_BLOCKS) are 16 and 32 wide, so these lengths cross full and partial
tiles in both directions."""
import importlib.util

import pytest
import torch

from op_testing import LOW_PRECISION, assert_accurate, gpu_only, leaf
from unigendet import backends, ops
from unigendet.ops.reference import mmsa_attention_ref, mmsa_consistency_loss_ref, mmsa_dense_mask

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_streams(B, Tg, Td, H, Hkv, D, dtype=torch.float32, seed=0, device=DEV):
    """q_g, k_g, v_g, q_d, k_d, v_d: q (B, T, H, D), k and v (B, T, Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Tg, H, D), (B, Tg, Hkv, D), (B, Tg, Hkv, D), (B, Td, H, D), (B, Td, Hkv, D), (B, Td, Hkv, D)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def loss_inputs(streams, len_g=None, len_d=None, scale=None, g_causal=False, d_causal=False):
    """(q_g, k_g, q_d, k_d, lse_g, lse_d) with the lse of the (reference) attention, all leaves."""
    q_g, k_g, v_g, q_d, k_d, v_d = streams
    _, _, lse_g, lse_d = mmsa_attention_ref(q_g, k_g, v_g, q_d, k_d, v_d, len_g=len_g, len_d=len_d, scale=scale,
                                            g_causal=g_causal, d_causal=d_causal, return_lse=True)
    acc = torch.promote_types(q_g.dtype, torch.float32)  # lse in fp32 (fp64 for fp64 streams)
    return [leaf(x) for x in (q_g, k_g, q_d, k_d, lse_g.to(acc), lse_d.to(acc))]


def dense_masses(streams, n_tokens, d_offset, g_offset=0, len_g=None, len_d=None, scale=None,
                 g_causal=False, d_causal=False):
    """Brute force: the dense (T x T) MMSA softmax over [G; D], then the masses by summing blocks.
    -> (m_gd, m_dg) each (B, H, N) fp64, and the (B, N) valid-row mask."""
    q_g, k_g, _, q_d, k_d, _ = [None if x is None else x.detach().double().cpu() for x in streams]  # v unused
    B, Tg, H, D = q_g.shape
    Td = q_d.shape[1]
    mask = mmsa_dense_mask(Tg, Td, g2d=True, d2g=True, g_causal=g_causal, d_causal=d_causal, len_g=len_g,
                           len_d=len_d, batch=B)  # (B, 1, T, T)
    q = torch.cat([q_g, q_d], 1).transpose(1, 2)  # (B, H, T, D)
    k = torch.cat([k_g, k_d], 1).transpose(1, 2).repeat_interleave(H // k_g.shape[2], 1)
    s = (q @ k.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)  # (B, H, T, T)
    i = torch.arange(n_tokens)
    m_gd = p[:, :, g_offset + i, Tg:].sum(-1)  # G query of token i: mass on D keys
    m_dg = p[:, :, Tg + d_offset + i, :Tg].sum(-1)  # D query of token i: mass on G keys
    lg = torch.full((B,), Tg) if len_g is None else len_g
    ld = torch.full((B,), Td) if len_d is None else len_d
    valid = (g_offset + i[None] < lg[:, None]) & (d_offset + i[None] < ld[:, None])
    return m_gd, m_dg, valid


def dense_loss(*args, **kwargs) -> torch.Tensor:
    m_gd, m_dg, valid = dense_masses(*args, **kwargs)
    sq = torch.where(valid[:, None], (m_gd - m_dg) ** 2, 0.0)
    return sq.sum() / (valid.sum() * m_gd.shape[1])


# ============================================================================= reference


@pytest.mark.parametrize("registers_first", [False, True])
@pytest.mark.parametrize("Hkv", [4, 1])
def test_reference_matches_dense_softmax(registers_first, Hkv):
    """Masses from the lse (sigmoid(lse_cross - lse_self)) equal the brute-force block sums of the
    dense softmax; the image tokens are D rows [R, R + N) or [0, N); causal G stream (the cross
    block is never causal); padded rows of either stream excluded."""
    B, N, R, H, D = 2, 11, 3, 4, 8
    streams = make_streams(B, N, N + R, H, Hkv, D, seed=1, device="cpu")
    len_g, len_d = torch.tensor([11, 7]), torch.tensor([14, 12])
    d_off = R if registers_first else 0
    kw = dict(len_g=len_g, len_d=len_d, g_causal=True)
    inputs = loss_inputs([x.double() for x in streams], **kw)
    got = ops.mmsa_consistency_loss(*inputs, n_tokens=N, d_offset=d_off, len_g=len_g, len_d=len_d,
                                    backend="reference")
    want = dense_loss(streams, N, d_off, **kw)
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float64 and got > 0


def test_reference_gradcheck_float64():
    B, N, R, H, Hkv, D = 1, 4, 2, 2, 1, 4
    streams = make_streams(B, N, N + R, H, Hkv, D, dtype=torch.float64, seed=2, device="cpu")
    inputs = loss_inputs(streams, len_d=torch.tensor([5]))
    fn = lambda *x: mmsa_consistency_loss_ref(*x, n_tokens=N, d_offset=0, len_d=torch.tensor([5]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x.double().detach().requires_grad_() for x in inputs])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_zero_when_masses_agree_by_construction(backend):
    """(1) Mirrored streams: D = G token for token, no registers. Each query's cross block equals
    its own-stream block, so both masses are exactly 1/2: loss 0 and zero gradients. (2) Any
    inputs with lse_self := lse_cross + c for both directions: both masses are exp(-c)."""
    B, N, H, Hkv, D = 2, 19, 2, 1, 16
    q, k, v = make_streams(B, N, N, H, Hkv, D, seed=3)[:3]
    inputs = loss_inputs([q, k, v, q, k, v])
    loss = ops.mmsa_consistency_loss(*inputs, n_tokens=N, d_offset=0, backend=backend)
    assert loss.abs().item() < 1e-12
    for gr in torch.autograd.grad(loss, inputs):
        assert gr.abs().max().item() < 1e-6
    # (2) unrelated streams, lse chosen so that the masses agree
    q_g, k_g, _, q_d, k_d, _ = make_streams(B, N, N + 4, H, Hkv, D, seed=4)
    sc = D ** -0.5
    cross = lambda q, k: torch.logsumexp(  # noqa: E731  (B, H, N): q rows 0..N-1 against all k
        torch.einsum("bqhd,bkhd->bhqk", q[:, :N], k.repeat_interleave(H // Hkv, 2)) * sc, -1)
    lse_g = cross(q_g, k_d) + 0.7
    lse_d = torch.cat([cross(q_d, k_g) + 0.7, torch.zeros(B, H, 4, device=DEV)], -1)  # registers last
    loss = ops.mmsa_consistency_loss(q_g, k_g, q_d, k_d, lse_g, lse_d, n_tokens=N, d_offset=0, backend=backend)
    assert loss.abs().item() < 1e-10
    lse_g2 = lse_g.clone()
    lse_g2[:, :, 5] += 1.0  # one row's masses now disagree: the loss is exactly that row's term
    loss = ops.mmsa_consistency_loss(q_g, k_g, q_d, k_d, lse_g2, lse_d, n_tokens=N, d_offset=0, backend=backend)
    m = torch.exp(torch.tensor(-0.7, dtype=torch.float64))
    want = (m * torch.exp(torch.tensor(-1.0, dtype=torch.float64)) - m) ** 2 / N  # B * H of B * H * N rows
    torch.testing.assert_close(loss.double().cpu(), want, atol=1e-7, rtol=1e-5)


def test_register_position_does_not_matter():
    """Moving the R registers from the front of the D stream to its end (d_offset R -> 0) leaves the
    loss unchanged: keys carry no causal mask here and the image-token range is explicit."""
    B, N, R, H, Hkv, D = 2, 9, 3, 2, 2, 8
    q_g, k_g, v_g, q_d, k_d, v_d = make_streams(B, N, N + R, H, Hkv, D, seed=5, device="cpu")
    perm = torch.cat([torch.arange(R, N + R), torch.arange(R)])  # registers first -> registers last
    front = loss_inputs([q_g, k_g, v_g, q_d, k_d, v_d])
    back = loss_inputs([q_g, k_g, v_g, q_d[:, perm], k_d[:, perm], v_d[:, perm]])
    a = ops.mmsa_consistency_loss(*front, n_tokens=N, d_offset=R)
    b = ops.mmsa_consistency_loss(*back, n_tokens=N, d_offset=0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", ["hkv", "lse_shape", "range", "dtype", "lens", "not_tensor"])
def test_bad_inputs_raise_clear_errors(bad):
    B, N, H, D = 1, 5, 4, 16
    q_g, k_g, _, q_d, k_d, _ = make_streams(B, N, N + 1, H, 2, D, device="cpu")
    lse_g, lse_d = torch.zeros(B, H, N), torch.zeros(B, H, N + 1)
    kw = dict(n_tokens=N, d_offset=0)
    if bad == "hkv":
        k_d = torch.zeros(B, N + 1, 3, D)
    elif bad == "lse_shape":
        lse_d = torch.zeros(B, H, N)
    elif bad == "range":
        kw["d_offset"] = 2
    elif bad == "dtype":
        q_d = q_d.double()
    elif bad == "lens":
        kw["len_g"] = torch.tensor([N + 1])
    elif bad == "not_tensor":
        lse_g = None
    with pytest.raises(ValueError, match="mmsa_consistency_loss"):
        ops.mmsa_consistency_loss(q_g, k_g, q_d, k_d, lse_g, lse_d, **kw)


# ============================================================================= mmsa_attention lse


def _lse_grads(fn, streams, kw):
    """Gradients of sum(w * lse over valid rows) w.r.t. q_g, k_g, q_d, k_d, plus the lse (valid rows)."""
    xs = [x.detach().double().requires_grad_() if fn == "dense" else x.detach().requires_grad_() for x in streams]
    if fn == "dense":  # independent: logsumexp of the dense masked score matrix over [G; D]
        q_g, k_g, _, q_d, k_d, _ = xs
        B, Tg, H, D = q_g.shape
        mask = mmsa_dense_mask(Tg, q_d.shape[1], g2d=kw["g2d"], d2g=kw["d2g"], g_causal=kw["g_causal"],
                               d_causal=False, len_g=kw["len_g"], len_d=kw["len_d"], batch=B, device=q_g.device)
        q = torch.cat([q_g, q_d], 1).transpose(1, 2)
        k = torch.cat([k_g, k_d], 1).transpose(1, 2).repeat_interleave(H // k_g.shape[2], 1)
        lse = torch.logsumexp((q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~mask, float("-inf")), -1)
        lse_g, lse_d = lse[..., :Tg], lse[..., Tg:]
    else:
        _, _, lse_g, lse_d = ops.mmsa_attention(*xs, return_lse=True, backend=fn, **kw)
    total, kept = 0.0, []
    for lse, lens, seed in ((lse_g, kw["len_g"], 7), (lse_d, kw["len_d"], 8)):
        B, H, T = lse.shape
        w = torch.randn(B, H, T, generator=torch.Generator().manual_seed(seed)).to(lse.device)
        valid = (torch.arange(T)[None] < lens[:, None]).to(lse.device)[:, None]  # (B, 1, T)
        sel = torch.where(valid, lse, 0.0)
        total = total + (sel * w).sum()
        kept.append(sel.detach().float())
    grads = torch.autograd.grad(total, [xs[0], xs[1], xs[3], xs[4]])
    return kept + [g.float() for g in grads]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_attention_lse_is_differentiable(backend):
    """mmsa_attention(return_lse=True) on both backends: lse and d(sum w * lse)/d(q, k) match the
    dense formulation (GQA, odd lengths, padding, a causal G stream)."""
    streams = make_streams(2, 21, 26, 4, 2, 32, seed=9)
    kw = dict(g2d=True, d2g=True, g_causal=True, len_g=torch.tensor([21, 13]), len_d=torch.tensor([19, 26]))
    got = _lse_grads(backend, streams, kw)
    want = _lse_grads("dense", streams, kw)
    for name, a, b in zip(["lse_g", "lse_d", "dq_g", "dk_g", "dq_d", "dk_d"], got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert ops.mmsa_attention(*streams, backend=backend)[0].shape == streams[0].shape  # default: no lse


# ============================================================================= Triton backend

CASES = {  # (B, N, R, H, Hkv, D, registers first, len_g, len_d, scale)
    "plain": (1, 21, 4, 2, 2, 16, False, None, None, None),
    "gqa_lens_front": (2, 19, 5, 4, 1, 32, True, [19, 12], [24, 15], None),
    "gqa_lens_end": (2, 33, 3, 4, 2, 16, False, [33, 30], [20, 36], 0.3),
}


def _case(name, dtype=torch.float32, seed=11):
    B, N, R, H, Hkv, D, front, len_g, len_d, scale = CASES[name]
    streams = make_streams(B, N, N + R, H, Hkv, D, seed=seed)
    lens = dict(len_g=None if len_g is None else torch.tensor(len_g),
                len_d=None if len_d is None else torch.tensor(len_d))
    inputs = [x.to(dtype) if i < 4 else x for i, x in enumerate(loss_inputs(streams, scale=scale, **lens))]
    return inputs, dict(n_tokens=N, d_offset=R if front else 0, scale=scale, **lens)


def _run(backend, inputs, kw, dtype=None):
    """[dq_g, dk_g, dq_d, dk_d, dlse_g, dlse_d, loss]; dtype: cast the inputs first (fp64: all, for 'exact')."""
    xs = [leaf(x, dtype if (dtype is not None and (i < 4 or dtype == torch.float64)) else None)
          for i, x in enumerate(inputs)]
    name = "reference" if backend == "exact" else backend
    loss = ops.mmsa_consistency_loss(*xs, backend=name, **kw)
    return [g.detach() for g in torch.autograd.grad(loss, xs)] + [loss.detach()]


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    """Forward and backward (into q, k of both streams and both lse inputs); no padded-row NaNs."""
    inputs, kw = _case(case)
    got, want = _run("triton", inputs, kw), _run("reference", inputs, kw)
    for name, a, b in zip(["dq_g", "dk_g", "dq_d", "dk_d", "dlse_g", "dlse_d", "loss"], got, want):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert got[-1] > 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_triton_accuracy_rule(dtype):
    """op_testing's rule: fp32 close to the fp64 reference; fp16/bf16 at most 2x eager's error
    (the reference in the same dtype); run-to-run identical."""
    inputs, kw = _case("gqa_lens_end", dtype=dtype, seed=12)
    run = lambda backend, *a: _run(backend, *a)  # noqa: E731
    assert_accurate(run, inputs, kw, candidate=lambda *a: _run("triton", *a))


@needs_triton
def test_triton_reads_the_triton_attention_lse():
    """The intended use: the Triton attention's lse (+inf on padded rows) feeds the loss; its
    gradient goes back through the attention's dlse path into q and k (and v gets none from it)."""
    from unigendet.kernels.attention import mmsa_attention_triton

    B, N, R, H, Hkv, D = 2, 17, 3, 2, 1, 16
    len_g, len_d = torch.tensor([17, 9]), torch.tensor([20, 14])
    grads = []
    for backend in ("triton", "reference"):
        xs = [x.requires_grad_() for x in make_streams(B, N, N + R, H, Hkv, D, seed=13)]
        attn = mmsa_attention_triton if backend == "triton" else mmsa_attention_ref
        _, _, lse_g, lse_d = attn(*xs, len_g=len_g, len_d=len_d, return_lse=True)
        loss = ops.mmsa_consistency_loss(xs[0], xs[1], xs[3], xs[4], lse_g, lse_d, n_tokens=N, d_offset=0,
                                         len_g=len_g, len_d=len_d, backend=backend)
        assert torch.isfinite(loss)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, xs, allow_unused=True)))
    for name, a, b in zip(["loss", "q_g", "k_g", "v_g", "q_d", "k_d", "v_d"], *grads):
        if name.startswith("v"):  # lse does not depend on the values
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.all(grads[0][1][1, 9:] == 0)  # padded G rows get no gradient


@needs_triton
def test_triton_backend_selection_and_op_registration():
    from unigendet.kernels import consistency as K
    from unigendet.ops import consistency as mod

    inputs, kw = _case("plain")
    if DEV == "cpu":  # auto never picks the interpreter
        assert backends.select(mod.OP, "auto", *inputs) is mmsa_consistency_loss_ref
    else:
        assert backends.select(mod.OP, "auto", *inputs) is mod._triton_impl
    assert ops.available_backends()[mod.OP] == ["triton", "reference"]
    with pytest.raises(ops.BackendError, match="head dim 8"):
        q_g, k_g, _, q_d, k_d, _ = make_streams(1, 5, 5, 2, 1, 8)
        ops.mmsa_consistency_loss(q_g, k_g, q_d, k_d, torch.zeros(1, 2, 5, device=DEV),
                                  torch.zeros(1, 2, 5, device=DEV), n_tokens=5, d_offset=0, backend="triton")
    with pytest.raises(ops.BackendError, match="lse_g and lse_d must be float32"):
        ops.mmsa_consistency_loss(*inputs[:4], inputs[4].half(), inputs[5], backend="triton", **kw)
    B, Tg, H, _ = inputs[0].shape
    lens = [torch.full((B,), Tg, dtype=torch.int32, device=DEV),
            torch.full((B,), inputs[2].shape[1], dtype=torch.int32, device=DEV)]
    torch.library.opcheck(K.mmsa_consistency_fwd, (*inputs, *lens, kw["n_tokens"], 0, kw["d_offset"], 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_triton
def test_triton_under_torch_compile():
    """The custom op has fake and autograd registrations: torch.compile traces the op without graph
    breaks (aot_eager keeps the check fast on the interpreter); same loss and gradients as eager."""
    inputs, kw = _case("plain", seed=14)

    def f(*x):
        return ops.mmsa_consistency_loss(*x, backend="triton", **kw) * 3.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(*inputs), f(*inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b)


@gpu_only
@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
def test_triton_gpu_realistic_shape(dtype):
    """Compiled kernels (16-bit tensor-core dots, autotuned tiles) at a model-like shape: N = 256
    image tokens, 4 registers, GQA 8 / 2, D = 64, padding; the accuracy rule against fp64."""
    streams = make_streams(2, 256, 260, 8, 2, 64, seed=15, device="cuda")
    lens = dict(len_g=torch.tensor([256, 200]), len_d=torch.tensor([260, 230]))
    inputs = [x.to(dtype) if i < 4 else x for i, x in enumerate(loss_inputs(streams, **lens))]
    kw = dict(n_tokens=256, d_offset=0, **lens)
    assert_accurate(lambda backend, *a: _run(backend, *a), inputs, kw, candidate=lambda *a: _run("triton", *a))


# ============================================================================= det-phase wiring


def _model(**kw):
    from unigendet import ModelConfig, UniGenDet

    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, kv_heads=1, registers=2, align_layer=1,
               projector_hidden=16)
    cfg.update(kw)
    return UniGenDet(ModelConfig(**cfg))


def _det_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    fakes = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    return images, torch.tensor([0.0, 1.0, 0.0]), torch.full((3,), -1, dtype=torch.long), fakes


def test_det_phase_adds_lambda_att_times_the_logged_mmsa_part():
    """total(lambda_att) - total(0) = lambda_att * parts["mmsa"]; the part equals the brute-force
    dense-softmax L_MMSA of the detection pass's layers; its gradient reaches both experts' qkv."""
    from unigendet.config import LossConfig
    from unigendet.train import PHASES, phase_loss

    m = _model()
    images, is_fake, ids, fakes = _det_batch()
    base = phase_loss(m, PHASES["det"], images, is_fake, ids, fakes, LossConfig(), None)
    terms = phase_loss(m, PHASES["det"], images, is_fake, ids, fakes, LossConfig(lambda_att=0.5), None)
    assert "mmsa" not in base.parts and set(terms.parts) == {"bce", "mmsa", "total"}
    mmsa = terms.parts["mmsa"]
    assert mmsa.dtype == torch.float32 and mmsa > 0
    torch.testing.assert_close(terms.total - base.total, 0.5 * mmsa, atol=1e-7, rtol=0)
    torch.testing.assert_close(terms.parts["bce"], base.parts["bce"], atol=0, rtol=0)
    # the logged part against the dense softmax of each layer's (q, k) as the attention saw them
    det = m("det", torch.cat([images, fakes]), return_attention=True)
    assert len(det.attention) == 2  # every layer is an MMSA layer with g2d and d2g on
    N = (16 // 4) ** 2
    want = [dense_loss([s.q_g, s.k_g, None, s.q_d, s.k_d, None], N, 0) for s in det.attention]
    torch.testing.assert_close(mmsa.double(), torch.stack(want).mean(), atol=1e-7, rtol=1e-5)
    # gradient of the added term alone: the difference of the two totals (same weights, same data)
    weights = [blk.experts[s].qkv.weight for blk in m.blocks for s in ("g", "d")]
    grads = torch.autograd.grad(terms.total - base.total, weights)
    assert all(g.abs().sum() > 0 for g in grads)


def test_lambda_att_zero_computes_nothing_extra(monkeypatch):
    from unigendet.config import LossConfig
    from unigendet.train import PHASES, phase_loss

    calls = []
    attention = ops.mmsa_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("return_lse", False))
        return attention(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("mmsa_consistency_loss called with lambda_att = 0")

    monkeypatch.setattr(ops, "mmsa_attention", spy)
    monkeypatch.setattr(ops, "mmsa_consistency_loss", refuse)
    m = _model()
    images, is_fake, ids, fakes = _det_batch()
    for phase in ("det", "joint"):
        terms = phase_loss(m, PHASES[phase], images, is_fake, ids, fakes, LossConfig(), None)
        assert "mmsa" not in terms.parts
    assert calls and not any(calls)  # no attention call asked for the lse
    assert m("det", images).attention is None


def test_return_attention_only_on_mmsa_layers():
    """A detection pass without g2d has no MMSA layer (G queries never read D): nothing collected."""
    images = _det_batch()[0]
    assert _model(g2d=False)("det", images, return_attention=True).attention == ()
    assert len(_model(mmsa_layers=(2,))("det", images, return_attention=True).attention) == 1  # layer 2 only
    stats = _model()("det", images, return_attention=True).attention
    B, N, R = 3, 16, 2
    assert stats[0].q_g.shape == (B, N, 2, 16) and stats[0].k_d.shape == (B, N + R, 1, 16)
    assert stats[0].lse_d.shape == (B, 2, N + R) and stats[0].lse_d.dtype == torch.float32


@pytest.mark.parametrize("override,match", [
    ("--loss.lambda_att=-0.1", r"loss.lambda_att must be a finite number >= 0"),
    ("--loss.lambda_att=nan", r"loss.lambda_att must be a finite number >= 0"),
    ("--loss.lambda_att=inf", r"loss.lambda_att must be a finite number >= 0"),
])
def test_lambda_att_config_is_validated(override, match):
    from unigendet.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config("tiny_cpu", [override])
    for off in ("--model.d2g=false", "--model.g2d=false", "--model.mmsa_layers=none"):
        with pytest.raises(ConfigError, match=r"loss.lambda_att > 0 needs model.g2d, model.d2g and at least one"):
            load_config("tiny_cpu", ["--loss.lambda_att=0.1", off])
    load_config("tiny_cpu", ["--loss.lambda_att=0.1", "--model.mmsa_layers=2"])
    assert load_config("tiny_cpu").loss.lambda_att == 0.0
    assert load_config("tiny_cpu", ["--loss.lambda_att=0.1"]).loss.lambda_att == 0.1
