"""One MoT layer: per-stream expert weights meeting in one MMSA joint attention (docs/design.md §1).

Hidden states travel as (x, res) pairs, the fused-residual form: the layer input is x + res, and
`fused_add_rmsnorm` both forms that sum (the new residual) and normalises it, saving a pass.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

StreamState = tuple[Tensor, "Tensor | None"]  # (x, res): (B, T, C) each; hidden = x + res


class AttentionStats(NamedTuple):
    """What L_MMSA (`ops.mmsa_consistency_loss`) reads from one MMSA layer of a detection sample."""
    q_g: Tensor    # (B, Tg, H, D) normed, rotated queries as the attention read them
    k_g: Tensor    # (B, Tg, Hkv, D)
    q_d: Tensor    # (B, Td, H, D)
    k_d: Tensor    # (B, Td, Hkv, D)
    lse_g: Tensor  # (B, H, Tg) fp32: each G query's log-sum-exp over all keys it reads
    lse_d: Tensor  # (B, H, Td) fp32


class ExpertWeights(nn.Module):
    """The weights one stream uses in a layer: norms, QKV, q/k norms, output projection, SwiGLU MLP."""

    def __init__(self, width: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        hd = width // heads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hd
        self.attn_norm = nn.Parameter(torch.ones(width))
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * hd, bias=False)
        self.q_norm = nn.Parameter(torch.ones(hd))
        self.k_norm = nn.Parameter(torch.ones(hd))
        self.out = nn.Linear(heads * hd, width, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(width))
        self.gate_up = nn.Linear(width, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, width, bias=False)

    def tensors(self, constant: bool = False) -> ExpertTensors:
        """The weights as tensors; constant=True detaches them (used, no gradient reaches them)."""
        get = (lambda t: t.detach()) if constant else (lambda t: t)  # noqa: E731
        return ExpertTensors(get(self.attn_norm), get(self.qkv.weight), get(self.q_norm), get(self.k_norm),
                             get(self.out.weight), get(self.mlp_norm), get(self.gate_up.weight), get(self.down.weight))


class ExpertTensors(NamedTuple):
    attn_norm: Tensor  # (C,)
    qkv: Tensor        # ((H + 2 Hkv) D, C)
    q_norm: Tensor     # (D,)
    k_norm: Tensor     # (D,)
    out: Tensor        # (C, H D)
    mlp_norm: Tensor   # (C,)
    gate_up: Tensor    # (2 F, C)
    down: Tensor       # (C, F)


class MoTBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, ffn: int, experts: str, eps: float):
        super().__init__()
        make = lambda: ExpertWeights(width, heads, kv_heads, ffn)  # noqa: E731
        # "mot": a generator expert and a detector expert; "shared": one weight set for both streams
        self.experts = nn.ModuleDict({"g": make(), "d": make()} if experts == "mot" else {"shared": make()})
        self.eps = eps

    def expert(self, stream: str) -> ExpertWeights:
        return self.experts[stream] if stream in self.experts else self.experts["shared"]

    def forward(self, states: dict[str, StreamState], rope: dict[str, tuple[Tensor, Tensor]],
                mask: dict, constant_experts: frozenset[str] = frozenset(),
                attention: list | None = None, key_only: frozenset[str] = frozenset()) -> dict[str, StreamState]:
        """states: {"g": (x, res), "d": (x, res)} (either may be absent); rope: {stream: (cos, sin)},
        each (T, D/2); mask: the MMSA switches g2d, d2g, g_causal, d_causal; constant_experts: the
        experts ("g", "d") whose weights are used as constants (no gradient reaches them);
        attention: a list to which this layer appends its `AttentionStats` when it is an MMSA layer
        (both streams present with queries, g2d and d2g on); None: nothing extra is computed; key_only: streams
        whose output is not needed, only their keys and values (the other stream's queries read
        them): no queries, no attention output, output projection or MLP; absent from the result."""
        weights = {s: self.expert(s).tensors(constant=s in constant_experts and s in self.experts) for s in states}
        qkv, residual = {}, {}
        for s, (x, res) in states.items():
            e, w = self.expert(s), weights[s]
            h, residual[s] = ops.fused_add_rmsnorm(x, res, w.attn_norm, self.eps)  # (B, T, C)
            B, T, _ = h.shape
            if s in key_only:  # k, v rows of the QKV weight only: ((2 Hkv) D, C)
                k, v = F.linear(h, w.qkv[e.heads * e.head_dim:]).view(B, T, 2 * e.kv_heads, e.head_dim).chunk(2, 2)
                # the op normalises and rotates a (q, k) pair; k stands in for q here, that result is dropped
                _, k = ops.qk_rmsnorm_rope(k, k, w.k_norm, w.k_norm, *rope[s], self.eps)  # (B, T, Hkv, D)
                qkv[s] = (None, k, v)
                continue
            q, k, v = F.linear(h, w.qkv).split([e.heads * e.head_dim, e.kv_heads * e.head_dim,
                                                e.kv_heads * e.head_dim], -1)
            q = q.view(B, T, e.heads, e.head_dim)     # (B, T, H, D)
            k = k.view(B, T, e.kv_heads, e.head_dim)  # (B, T, Hkv, D)
            v = v.view(B, T, e.kv_heads, e.head_dim)
            q, k = ops.qk_rmsnorm_rope(q, k, w.q_norm, w.k_norm, *rope[s], self.eps)
            qkv[s] = (q, k, v)
        none3 = (None, None, None)
        # an MMSA layer for L_MMSA: both streams with queries (not key-only) and both cross directions on
        if attention is not None and all(qkv.get(s, none3)[0] is not None for s in "gd") and mask["g2d"] \
                and mask["d2g"]:
            o_g, o_d, lse_g, lse_d = ops.mmsa_attention(*qkv["g"], *qkv["d"], **mask, return_lse=True)
            attention.append(AttentionStats(qkv["g"][0], qkv["g"][1], qkv["d"][0], qkv["d"][1], lse_g, lse_d))
        else:
            o_g, o_d = ops.mmsa_attention(*qkv.get("g", none3), *qkv.get("d", none3), **mask)
        out = {}
        for s, o in (("g", o_g), ("d", o_d)):
            if o is None:
                continue
            w = weights[s]
            x = F.linear(o.flatten(2), w.out)  # (B, T, C)
            h, res = ops.fused_add_rmsnorm(x, residual[s], w.mlp_norm, self.eps)
            out[s] = (F.linear(ops.swiglu(F.linear(h, w.gate_up)), w.down), res)
        return out
