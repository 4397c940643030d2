"""mmsa_attention, "ext" backend (the C++ CPU kernels of csrc/cpu/attention.h): the docs/design.md §4 checks
against the fp64 reference, forward and backward (through the lse too), every switch, causal streams, GQA,
padding, key-only and absent streams, odd shapes (D not a multiple of the vector width), fp64 / fp32 / bf16,
gradcheck, the op registrations (opcheck, torch.compile without graph breaks) and the backend choice."""
import itertools

import pytest
import torch

from op_testing import EXT_ONLY
from test_ops_attention_sdpa import _inputs, _run, check_bf16_within_2x_eager
from unigendet import backends, ops
from unigendet.ops.attention_ext import MAX_SCORES, ext_check, mmsa_attention_ext
from unigendet.ops.reference import mmsa_attention_ref

pytestmark = EXT_ONLY
SWITCHES = list(itertools.product([False, True], repeat=4))  # g2d, d2g, g_causal, d_causal


def _compare(inputs, kw, dtype, atol, rtol, drop=()):
    got = _run(mmsa_attention_ext, inputs, kw, dtype, drop=drop)
    exact = _run(mmsa_attention_ref, inputs, kw, torch.float64, drop=drop)
    assert len(got) == len(exact)
    for i, (a, b) in enumerate(zip(got, exact)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m, i=i: f"result {i}: {m}")


@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal", SWITCHES)
def test_fp64_exact_all_switches_gqa_padding(g2d, d2g, g_causal, d_causal):
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal,
              len_g=torch.tensor([13, 7, 1]), len_d=torch.tensor([11, 17, 2]))
    for Hkv in (4, 2):
        _compare(_inputs(3, 13, 17, 4, Hkv, 8, seed=Hkv), kw, torch.float64, atol=1e-12, rtol=1e-10)


# B, Tg, Td, H, Hkv, D: odd T, D in {8, 24, 40} and others (vector tails), GQA 1 and 2, B 1 and 3
SHAPES = [(1, 1, 1, 1, 1, 8), (3, 5, 2, 2, 1, 24), (1, 33, 65, 4, 2, 40), (3, 9, 7, 2, 2, 5), (1, 70, 9, 2, 1, 24),
          (3, 17, 19, 4, 4, 72)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("switches", [(True, True, False, False), (True, False, True, True),
                                      (False, True, True, False), (False, False, False, True)])
def test_fp32_odd_shapes(shape, switches):
    B, Tg, Td, H, Hkv, D = shape
    g2d, d2g, g_causal, d_causal = switches
    len_d = torch.tensor([max(1, Td - 3 * b) for b in range(B)])
    len_g = torch.tensor([max(1, Tg - b) for b in range(B)])
    kw = dict(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, len_g=len_g, len_d=len_d, scale=0.3)
    _compare(_inputs(*shape, seed=sum(shape)), kw, torch.float32, atol=2e-5, rtol=1e-4)
    kw.update(len_g=None, len_d=None, scale=None)
    _compare(_inputs(*shape, seed=sum(shape) + 1), kw, torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("key_only", ["g", "d"])
@pytest.mark.parametrize("switches", [(True, True), (False, True), (True, False)])
def test_key_only_and_absent_streams(key_only, switches):
    inputs = _inputs(2, 9, 6, 4, 2, 24, seed=3)
    kw = dict(g2d=switches[0], d2g=switches[1], len_g=torch.tensor([9, 4]), len_d=torch.tensor([6, 2]),
              g_causal=True)
    q = 0 if key_only == "g" else 3
    if switches[key_only == "g"]:  # the other stream reads the key-only stream's keys
        _compare(inputs, kw, torch.float64, atol=1e-12, rtol=1e-10, drop=(q,))
        _compare(inputs, kw, torch.float32, atol=2e-5, rtol=1e-4, drop=(q,))
    _compare(inputs, kw, torch.float32, atol=2e-5, rtol=1e-4, drop=(q, q + 1, q + 2))  # absent: self-attention


@pytest.mark.parametrize("switches", [(True, True, False, False), (True, True, True, True), (False, True, False, True)])
def test_bf16_within_2x_eager(switches):
    check_bf16_within_2x_eager(mmsa_attention_ext, switches, head_dim=24, label="ext bf16")


def test_gradcheck_float64():
    inputs = [x.requires_grad_() for x in _inputs(1, 3, 4, 2, 1, 5, seed=6)]
    fn = lambda *x: mmsa_attention_ext(*x, d_causal=True, len_d=torch.tensor([3]), return_lse=True)  # noqa
    assert torch.autograd.gradcheck(fn, inputs)
    fn = lambda *x: mmsa_attention_ext(*x, g2d=False, g_causal=True, return_lse=True)  # noqa
    assert torch.autograd.gradcheck(fn, inputs)


def test_strided_inputs_padded_rows_zero_and_deterministic():
    """Views of a fused qkv projection (unit stride along D only) give the results of contiguous inputs."""
    B, T, H, Hkv, D = 2, 10, 4, 2, 24
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D)
    q_g, k_g, v_g = (t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, Hkv * D, Hkv * D], -1))
    x = [q_g, k_g, v_g] + [t.float() for t in _inputs(B, T, 8, H, Hkv, D, seed=7)[3:]]
    kw = dict(len_g=torch.tensor([10, 4]), len_d=torch.tensor([3, 8]))
    out = mmsa_attention_ext(*x, **kw, return_lse=True)
    ref = mmsa_attention_ext(*[t.contiguous() for t in x], **kw, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert torch.all(out[0][1, 4:] == 0) and torch.all(out[1][0, 3:] == 0)
    assert torch.isfinite(out[2]).all() and torch.isfinite(out[3]).all()
    a = _run(mmsa_attention_ext, x, kw, torch.float32)
    b = _run(mmsa_attention_ext, x, kw, torch.float32)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_results_do_not_depend_on_the_thread_count():
    x = _inputs(3, 21, 30, 4, 2, 24, seed=8)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(mmsa_attention_ext, x, dict(d_causal=True), torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_nan_query_gives_nan_where_the_reference_does():
    # the fp32 exp polynomial clamps its argument: a NaN must come through the clamp, not turn into 0 or 1
    x = [t.float() for t in _inputs(1, 9, 7, 2, 2, 16, seed=11)]
    x[0][0, 3, 0, 2] = float("nan")
    for kw in (dict(), dict(d2g=False)):
        ours, ref = mmsa_attention_ext(*x, **kw), mmsa_attention_ref(*x, **kw)
        assert all(torch.equal(a.isnan(), b.isnan()) for a, b in zip(ours, ref))
        assert ours[0].isnan().any()


@pytest.mark.parametrize("g2d,d2g", [(False, True), (True, False), (False, False)])
def test_a_stream_that_does_not_read_the_other_does_not_depend_on_it(g2d, d2g):
    x = [t.float().requires_grad_() for t in _inputs(2, 5, 6, 2, 1, 8, seed=9)]
    o_g, o_d = mmsa_attention_ext(*x, g2d=g2d, d2g=d2g)
    for out, other_kv, reads in ((o_g, x[4:6], g2d), (o_d, x[1:3], d2g)):
        grads = torch.autograd.grad(out.sum(), other_kv, retain_graph=True, allow_unused=True)
        assert all((g is not None) == reads for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = [t.to(dtype).requires_grad_() for t in _inputs(2, 5, 7, 4, 2, 24, seed=10)]
    lens = (torch.tensor([5, 3]), torch.tensor([7, 1]))
    flags = (True, True, True, False, 0.2)
    torch.library.opcheck(torch.ops.unigendet.mmsa_attention, (*x, *lens, *flags))
    key_only = (None, *x[1:], *lens, False, True, False, True, 0.2)
    torch.library.opcheck(torch.ops.unigendet.mmsa_attention, key_only)
    with torch.no_grad():
        o_g, o_d, l_g, l_d = torch.ops.unigendet.mmsa_attention(*x, *lens, *flags)
    go_g, go_d, gl_g, gl_d = torch.randn_like(o_g), torch.randn_like(o_d), torch.randn_like(l_g), None
    xs = [t.detach() for t in x]
    torch.library.opcheck(torch.ops.unigendet.mmsa_attention_backward,
                          (go_g, go_d, gl_g, gl_d, *xs, o_g, o_d, l_g, l_d, *lens, *flags))


def test_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    x = [t.float().requires_grad_() for t in _inputs(2, 6, 5, 4, 2, 24, seed=11)]
    kw = dict(len_d=torch.tensor([5, 2]), g_causal=True, return_lse=True)
    fn = lambda *t: [o.sum() for o in mmsa_attention_ext(*t, **kw)]  # noqa: E731
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(*x)
    torch.autograd.grad(sum(got), x)
    assert dict(counters["graph_break"]) == {}
    want = fn(*x)
    torch.testing.assert_close(torch.stack(got), torch.stack(want))


def test_backend_selection_and_refusals():
    x = [t.float() for t in _inputs(1, 4, 4, 2, 2, 8)]
    o = ops.mmsa_attention(*x, backend="ext")
    torch.testing.assert_close(o[0], mmsa_attention_ref(*x)[0])
    assert backends.BACKEND_NAMES.index("ext") < backends.BACKEND_NAMES.index("sdpa")
    meta = [t.to("meta") for t in x]
    with pytest.raises(ops.BackendError, match="CPU tensors only|device meta unsupported"):
        backends.select("mmsa_attention", "ext", *meta)
    long = torch.empty(1, MAX_SCORES // 1000 + 1, 1, 8)
    assert "score buffer" in ext_check(long, long, long, long, long, long)
    chosen = backends.select("mmsa_attention", "auto", long, long, long, long, long, long)
    assert chosen.__name__ == "mmsa_attention_sdpa"  # auto falls back


def test_op_rejects_bad_lengths():
    x = [t.float() for t in _inputs(2, 4, 3, 2, 2, 8)]
    with pytest.raises(RuntimeError, match="must be in \\[1, 3\\]"):
        torch.ops.unigendet.mmsa_attention(*x, None, torch.tensor([3, 4]), True, True, False, False, 1.0)
