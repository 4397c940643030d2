"""What the Triton kernels read, counted under the interpreter (tests/triton_traffic.py): the claims of
kernels/attention.py and kernels/loss.py that make them fast, checked on the CPU.

Attention: forbidden (stream, stream) pairs, keys at or past `len` and query tiles at or past `len`
are never visited, and a causal stream stops at its diagonal: the K/V tiles the forward and dQ
kernels load, and the Q tiles the dK/dV kernel loads, equal a closed-form count of the allowed
blocks for all 16 switch settings, with padding and GQA.
Loss: one pass over student and teacher computes the loss parts and the stored gradient, which
the backward of `total.backward()` does not touch.
Memory (tests/allocations.py): the loss allocates its gradients and a few partial sums only, the
attention memory grows linearly in T (eager: (M, C) fp32 temporaries; (T, T) scores).
"""
import itertools
import math

import pytest
import torch

from allocations import allocated
from triton_traffic import traffic
from unigendet import ops

attention = pytest.importorskip("unigendet.kernels.attention")
if not attention.INTERPRET:
    pytest.skip("counts tiles under the Triton interpreter (CPU)", allow_module_level=True)

B, TG, TD, H, HKV, D = 2, 37, 50, 2, 1, 16
LEN_G, LEN_D = [37, 20], [50, 33]


def visited(T: int, lens: list[int], other_lens: list[int], tile: int, block: int, *, own: bool,
            causal=None) -> int:
    """Blocks of `block` rows visited by every `tile`-row tile of a stream of length T, summed over
    batch and heads. A tile at or past its sample's length visits none; otherwise all blocks below
    that length in its own stream (other_lens: in the other one), or causal(tile start, length) blocks
    when its own stream is causal."""
    total = 0
    for length, other in zip(lens, other_lens):
        for start in range(0, T, tile):
            if start < length:
                total += causal(start, length) if own and causal else math.ceil((length if own else other) / block)
    return total * H


def key_blocks(T_q, lens_q, lens_k, block_m, block_n, *, own, causal) -> int:
    """Forward and dQ: key blocks read by the query tiles; a causal tile stops at its last row."""
    upto_last_row = (lambda start, n: math.ceil(min(start + block_m, n) / block_n)) if causal else None
    return visited(T_q, lens_q, lens_k, block_m, block_n, own=own, causal=upto_last_row)


def query_blocks(T_k, lens_k, lens_q, block_m, block_n, *, own, causal) -> int:
    """dK/dV: query blocks read by the key tiles; a causal tile starts at its first key."""
    from_first_key = (lambda start, n: math.ceil((n - start) / block_m)) if causal else None
    return visited(T_k, lens_k, lens_q, block_n, block_m, own=own, causal=from_first_key)


@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal", list(itertools.product([False, True], repeat=4)))
def test_attention_visits_exactly_the_allowed_blocks(g2d, d2g, g_causal, d_causal):
    gen = torch.Generator().manual_seed(0)
    streams = {s: [torch.randn(B, T, h, D, generator=gen).requires_grad_() for h in (H, HKV, HKV)]
               for s, T in (("g", TG), ("d", TD))}
    named = {f"{x}_{s}": t for s, qkv in streams.items() for x, t in zip("qkv", qkv)}
    with traffic(**named) as seen:
        o_g, o_d = ops.mmsa_attention(*streams["g"], *streams["d"], g2d=g2d, d2g=d2g, g_causal=g_causal,
                                      d_causal=d_causal, len_g=torch.tensor(LEN_G), len_d=torch.tensor(LEN_D),
                                      backend="triton")
        (o_g.sum() + o_d.sum()).backward()

    for kernel, which in (("_mmsa_fwd", "fwd"), ("_mmsa_bwd_dq", "dq")):
        bm, bn = attention.INTERPRET_BLOCKS[which]
        expect = {
            "g": key_blocks(TG, LEN_G, LEN_G, bm, bn, own=True, causal=g_causal)
            + (key_blocks(TD, LEN_D, LEN_G, bm, bn, own=False, causal=False) if d2g else 0),
            "d": key_blocks(TD, LEN_D, LEN_D, bm, bn, own=True, causal=d_causal)
            + (key_blocks(TG, LEN_G, LEN_D, bm, bn, own=False, causal=False) if g2d else 0),
        }
        for s in "gd":
            for x in "kv":
                got = seen[(kernel, f"{x}_{s}")]["load_tiles"]
                assert got == expect[s], f"{kernel}: {got} tiles of {x}_{s} loaded, {expect[s]} allowed"

    bm, bn = attention.INTERPRET_BLOCKS["dkdv"]
    expect = {  # query tiles read by the key tiles of both key streams
        "g": query_blocks(TG, LEN_G, LEN_G, bm, bn, own=True, causal=g_causal)
        + (query_blocks(TD, LEN_D, LEN_G, bm, bn, own=False, causal=False) if g2d else 0),
        "d": query_blocks(TD, LEN_D, LEN_D, bm, bn, own=True, causal=d_causal)
        + (query_blocks(TG, LEN_G, LEN_D, bm, bn, own=False, causal=False) if d2g else 0),
    }
    for s in "gd":
        got = seen[("_mmsa_bwd_dkdv", f"q_{s}")]["load_tiles"]
        assert got == expect[s], f"dK/dV: {got} tiles of q_{s} loaded, {expect[s]} allowed"


@pytest.mark.parametrize("C, passes", [(129, 1), (1024, 1), (8200, 2)])  # rows wider than 8192: two passes
@pytest.mark.parametrize("scaled", [False, True])
def test_loss_reads_its_inputs_once_and_backward_leaves_the_stored_gradient_alone(C, passes, scaled):
    gen = torch.Generator().manual_seed(1)
    M, N = 37, 33
    student = torch.randn(M, C, generator=gen, dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(M, C, generator=gen, dtype=torch.bfloat16)
    logits = torch.randn(N, generator=gen).requires_grad_()
    targets, weights = torch.rand(N, generator=gen), torch.rand(N, generator=gen)
    with traffic(student=student, teacher=teacher, logits=logits, targets=targets, weights=weights) as seen:
        total = ops.bce_diga_loss(logits, targets, weights, student, teacher, w_align=0.5, backend="triton").total
    for name, t, n in (("student", student, passes), ("teacher", teacher, passes), ("logits", logits, 1),
                       ("targets", targets, 1), ("weights", weights, 1)):
        s = seen[("_fwd_kernel", name)]
        assert (s["loaded"], s["stored"]) == (n * t.nbytes, 0), f"{name}: {s}"
    grad = seen[("_fwd_kernel", "gs_ptr")]  # the stored student gradient: written once, not read
    assert (grad["loaded"], grad["stored"]) == (0, student.nbytes)

    with traffic() as seen:
        (3.0 * total if scaled else total).backward()
    grad = seen[("_bwd_kernel", "gs_ptr")]
    # the usual total.backward() needs no pass over it; a scaled one rescales it in place, once
    assert (grad["loaded"], grad["stored"]) == ((student.nbytes,) * 2 if scaled else (0, 0)), grad
    assert student.grad is not None and student.grad.isfinite().all()


def test_loss_allocates_its_gradients_only():
    gen = torch.Generator().manual_seed(2)
    M, C, N = 300, 1024, 333
    student = torch.randn(M, C, generator=gen, dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(M, C, generator=gen, dtype=torch.bfloat16)
    logits = torch.randn(N, generator=gen).requires_grad_()
    targets, weights = torch.rand(N, generator=gen), torch.rand(N, generator=gen)
    grads = student.nbytes + logits.nbytes

    def alloc(backend):
        with allocated() as a:
            ops.bce_diga_loss(logits, targets, weights, student, teacher, backend=backend).total.backward()
        student.grad = logits.grad = None
        return a

    fused, eager = alloc("triton"), alloc("reference")
    inputs = student.nbytes + teacher.nbytes + logits.nbytes + targets.nbytes + weights.nbytes
    assert fused.bytes <= grads + 0.1 * inputs, (fused.bytes, grads, fused.largest)
    assert fused.largest[1] == student.nbytes  # the stored gradient, in the student's dtype
    assert eager.bytes > 4 * grads  # the same check on the eager code: its fp32 (M, C) temporaries


@pytest.mark.parametrize("causal", [False, True])
def test_attention_memory_is_linear_in_sequence_length(causal):
    def alloc(T, backend):
        gen = torch.Generator().manual_seed(3)
        qkv = [torch.randn(1, T, h, D, generator=gen).requires_grad_() for _ in "gd" for h in (H, HKV, HKV)]
        with allocated() as a:
            o_g, o_d = ops.mmsa_attention(*qkv, g_causal=causal, backend=backend)
            (o_g.sum() + o_d.sum()).backward()
        return a.bytes

    fused = [alloc(T, "triton") for T in (48, 96)]
    eager = [alloc(T, "reference") for T in (48, 96)]
    assert fused[1] <= 2.1 * fused[0], fused  # outputs, LSE, gradients: O(T)
    assert eager[1] >= 3 * eager[0], eager  # the reference's (T, T) scores: the check can tell
