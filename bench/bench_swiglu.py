"""Benchmark `swiglu`: (N, 2F) -> (N, F).

    python -m bench.bench_swiglu              # CUDA if present (bf16, N=32k, F=4096), else CPU
    python -m bench.bench_swiglu --device cpu # fp32, N=8192, F in {1024, 4096}

Bytes that must move: forward reads gate_up and writes out (3 N F elements); backward reads grad_out
and gate_up and writes grad_gate_up (5 N F). Targets (the project's goals): CPU >= 2x eager and >= torch.compile;
H100/H200 >= 85% of the copy bandwidth. Harness: bench/membound.py.
"""
from __future__ import annotations

from bench.membound import Case, run  # first: it configures torch's CPU allocator

import torch
from unigendet.ops.reference import swiglu_ref
from unigendet.ops.swiglu import swiglu_ext


def cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    shapes = [(32 * 1024, 4096)] if device.type == "cuda" else [(8192, 1024), (8192, 4096)]
    out = []
    for N, F in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        gate_up = torch.randn(N, 2 * F, generator=g, device=device, dtype=dtype)
        grad = torch.randn(N, F, generator=g, device=device, dtype=dtype)
        es = dtype.itemsize
        out.append(Case(f"N{N}-F{F}", [gate_up.requires_grad_()], [grad], 3 * N * F * es, 5 * N * F * es))
    return out


if __name__ == "__main__":
    run("swiglu", "bench_swiglu", cases, swiglu_ref, swiglu_ext)
