"""Benchmark `fused_add_rmsnorm` (with residual; gradients reach x, residual, weight and both outputs).

    python -m bench.bench_rmsnorm                    # CUDA if present (bf16, N=32k, C=4096), else CPU
    python -m bench.bench_rmsnorm --device cpu       # fp32, N=8192, C in {1024, 4096}

Bytes that must move: forward reads x, residual and writes y, res (4 N C elements); backward reads
grad_y, grad_res, res and writes grad_x (4 N C). Targets (the project's goals): CPU >= 2x eager and >= torch.compile;
H100/H200 >= 85% of the copy bandwidth. Harness: bench/membound.py.
"""
from __future__ import annotations

from bench.membound import Case, run  # first: it configures torch's CPU allocator

import torch
from unigendet.ops.reference import fused_add_rmsnorm_ref
from unigendet.ops.rmsnorm import fused_add_rmsnorm_ext


def cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    shapes = [(32 * 1024, 4096)] if device.type == "cuda" else [(8192, 1024), (8192, 4096)]
    out = []
    for N, C in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x, r, gy, gr = (torch.randn(N, C, generator=g, device=device, dtype=dtype) for _ in range(4))
        w = torch.randn(C, generator=g, device=device, dtype=dtype)
        nbytes = 4 * N * C * dtype.itemsize
        out.append(Case(f"N{N}-C{C}", [x.requires_grad_(), r.requires_grad_(), w.requires_grad_()], [gy, gr],
                        nbytes, nbytes))
    return out


if __name__ == "__main__":
    run("fused_add_rmsnorm", "bench_rmsnorm", cases, fused_add_rmsnorm_ref, fused_add_rmsnorm_ext)
