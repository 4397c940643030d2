"""Benchmark `qk_rmsnorm_rope`: per-head RMSNorm of q and k, then rotate-half RoPE.

    python -m bench.bench_rope                    # CUDA if present (bf16, published shape), else CPU
    python -m bench.bench_rope --device cpu       # fp32, B=2, T=1024, H=16, Hkv=4, D=64

q and k are strided views of one fused qkv projection, as in the model. Bytes that must move:
forward reads q, k and writes both outputs (2 (H + Hkv) B T D elements); backward reads the two
output gradients and q, k, writes grad_q, grad_k (3 (H + Hkv) B T D). Harness: bench/membound.py.
"""
from __future__ import annotations

from bench.membound import Case, run  # first: it configures torch's CPU allocator

import torch
from unigendet.ops.reference import qk_rmsnorm_rope_ref
from unigendet.ops.rope import qk_rmsnorm_rope_ext


def cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    # (name, B, T, H, Hkv, D)
    shapes = ([("B4-T1024-H16-D64", 4, 1024, 16, 16, 64), ("published", 1, 4096, 28, 4, 128)]
              if device.type == "cuda" else [("B2-T1024-H16-Hkv4-D64", 2, 1024, 16, 4, 64)])
    out = []
    for name, B, T, H, Hkv, D in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g, device=device, dtype=dtype).requires_grad_()
        q, k, _v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
        q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
        qw, kw = (torch.ones(D, device=device, dtype=dtype).requires_grad_() for _ in range(2))
        ang = torch.rand(T, D // 2, generator=g, device=device) * 6.28
        ups = [torch.randn(B, T, h, D, generator=g, device=device, dtype=dtype) for h in (H, Hkv)]
        elems = (H + Hkv) * B * T * D
        es = dtype.itemsize
        out.append(Case(name, [q, k, qw, kw, ang.cos().to(dtype), ang.sin().to(dtype)], ups,
                        2 * elems * es, 3 * elems * es))
    return out


if __name__ == "__main__":
    run("qk_rmsnorm_rope", "bench_rope", cases, qk_rmsnorm_rope_ref, qk_rmsnorm_rope_ext)
