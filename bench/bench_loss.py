"""Benchmark `bce_diga_loss` forward + backward: ours (fused Triton) vs eager vs torch.compile(eager).

    python -m bench.bench_loss                    # CUDA if present, else CPU
    python -m bench.bench_loss --device cpu       # reduced shapes, Triton interpreter (correct, slow)

Each provider computes (total, bce, align) and the gradients w.r.t. logits and student through
`torch.autograd.grad` (so no `.grad` accumulation pass is timed). GB/s counts only the bytes that
must move: logits/targets/weights and student/teacher read once, the logits and student gradients
written once. Peak memory is what the step allocates above its inputs; `mem_x` is
(inputs + peak) / (inputs + gradients), the goal being <= 1.1. The device's copy bandwidth
(a large `copy_`, read + write) is measured first so that GB/s can be judged (`%copy`).

Shapes: CUDA: M in {16k, 256k, 1M} x C in {1024, 3584}, bf16 (the goal's shapes). CPU: M in {256, 1024} x
C in {128, 1024}: the kernel runs under the Triton interpreter there, so the CPU numbers prove the
script works, nothing about the kernel's speed.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.common import (add_ratio_to, bench_device, copy_bandwidth_gbs, device_name, markdown_table,
                          measure_ms, peak_memory_mb, write_results)

CUDA_SHAPES = [(m, c) for m in (16 * 1024, 256 * 1024, 1024 * 1024) for c in (1024, 3584)]
CPU_SHAPES = [(m, c) for m in (256, 1024) for c in (128, 1024)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_loss(z, y, w, s, t, w_align: float = 0.5):
    """The eager baseline in the inputs' dtype: BCE-with-logits + cosine similarity."""
    bce = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() / w.sum().clamp_min(1e-12)
    align = (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    return bce + w_align * align, bce, align


def ours_loss(z, y, w, s, t, w_align: float = 0.5):
    from unigendet import ops

    return ops.bce_diga_loss(z, y, w, s, t, w_align=w_align, backend="triton")


def make_inputs(M: int, C: int, N: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(N, device=device, generator=g) * 3).to(dtype).requires_grad_()
    y = (torch.rand(N, device=device, generator=g) > 0.5).to(dtype)
    w = torch.rand(N, device=device, generator=g).to(dtype)
    s = torch.randn(M, C, device=device, generator=g, dtype=dtype).requires_grad_()
    t = torch.randn(M, C, device=device, generator=g, dtype=dtype)
    return z, y, w, s, t


def step_fn(loss_fn, inputs):
    z, y, w, s, t = inputs

    def step():
        parts = loss_fn(z, y, w, s, t)
        return torch.autograd.grad(parts[0], [z, s])

    return step


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--n", type=int, default=1024, help="BCE rows N (detector + authenticity logits)")
    ap.add_argument("--providers", default="ours,eager,compile")
    ap.add_argument("--shapes", default="", help="M:C,M:C,... (default: the device's shape set)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = ap.parse_args(argv)
    device = bench_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dtype = DTYPES[args.dtype]
    shapes = ([tuple(int(v) for v in sc.split(":")) for sc in args.shapes.split(",")] if args.shapes
              else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES))
    providers = [p for p in args.providers.split(",") if p]
    timing = {} if device.type == "cuda" else {"warmup": 1, "reps": 3}

    dev = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {dev}; copy bandwidth {copy_gbs:.1f} GB/s; dtype {args.dtype}; N = {args.n}")
    rows = []
    title = f"bce_diga_loss fwd+bwd on {dev} (copy {copy_gbs:.1f} GB/s)"

    def save():  # after every measurement: a run cut short keeps what finished
        add_ratio_to(rows, "ours", ("M", "C", "N", "dtype"), "ours_speedup")
        if not args.no_save:
            return write_results("bench_loss", [{**r, "copy_GB/s": copy_gbs} for r in rows], device,
                                 plot=("GB/s", ["M", "C"]))

    for M, C in shapes:
        inputs = make_inputs(M, C, args.n, dtype, device)
        es = dtype.itemsize
        in_bytes = 3 * args.n * es + 2 * M * C * es
        grad_bytes = args.n * es + M * C * es
        must_move = in_bytes + grad_bytes
        for prov in providers:
            if prov == "ours":
                fn = step_fn(ours_loss, inputs)
            elif prov == "eager":
                fn = step_fn(eager_loss, inputs)
            elif prov == "compile":
                torch._dynamo.reset()
                fn = step_fn(torch.compile(eager_loss, dynamic=False), inputs)
            else:
                raise SystemExit(f"unknown provider {prov!r}")
            try:
                fn()  # compile / warm up outside the timing
                ms = measure_ms(fn, device, **timing)
                peak = peak_memory_mb(fn, device)
            except torch.OutOfMemoryError:
                print(f"{prov} M={M} C={C}: out of memory", flush=True)
                del fn
                torch.cuda.empty_cache()
                continue
            row = {"M": M, "C": C, "N": args.n, "dtype": args.dtype, "provider": prov, "ms": ms,
                   "GB/s": must_move / ms / 1e6, "%copy": 100 * must_move / ms / 1e6 / copy_gbs,
                   "peak_MiB": peak,
                   "mem_x": None if peak is None else (in_bytes + peak * 2**20) / (in_bytes + grad_bytes)}
            rows.append(row)
            print(f"M={M} C={C} {prov}: {ms:.4g} ms, {row['GB/s']:.4g} GB/s", flush=True)
            save()
            del fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inputs
    cols = ["M", "C", "N", "dtype", "provider", "ms", "GB/s", "%copy", "peak_MiB", "mem_x", "ours_speedup"]
    print(markdown_table(rows, cols, title=title))
    if not args.no_save:
        print(f"wrote {save()}/bench_loss.csv and .md")  # also when nothing was measured
    return rows


if __name__ == "__main__":
    main()
