"""Harness of the memory-bound backbone-op benchmarks (bench_norm.py, bench_activation.py, bench_rope.py).

For each case and provider it times forward, backward and forward+backward (backward alone is
`torch.autograd.grad` of one forward's outputs with retain_graph), reports ms and GB/s from the bytes
that must move (each input read once, each output written once), `%copy` against the device's
measured copy bandwidth, and `x_eager` / `x_compile`: how many times faster than those providers.

Providers: `ext` (the extension unigendet._C), `eager` (the reference in ops/reference.py, eager
PyTorch), `compile` (torch.compile of the same reference, dynamic=False).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

import torch

from bench.common import bench_device, copy_bandwidth_gbs, device_name, markdown_table, measure_ms, write_results

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("ext", "eager", "compile")


@dataclass
class Case:
    name: str
    inputs: list            # leaves (requires_grad where a gradient is wanted) and constants
    upstream: list          # gradients of the outputs the backward receives (None: output unused)
    bytes_fwd: int          # bytes that must move in the forward
    bytes_bwd: int          # ... in the backward


def _grad_targets(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def timed_fns(fn: Callable, case: Case) -> dict[str, Callable[[], object]]:
    """Closures for each mode over one forward function."""
    wrt = _grad_targets(case.inputs)

    def outputs():
        out = fn(*case.inputs)
        return out if isinstance(out, tuple) else (out,)

    def backward(outs):
        pairs = [(o, g) for o, g in zip(outs, case.upstream) if g is not None]
        return torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], retain_graph=True)

    saved = outputs()
    return {"fwd": lambda: fn(*case.inputs), "bwd": lambda: backward(saved), "fwd+bwd": lambda: backward(outputs())}


def run(title: str, result_name: str, cases_for: Callable[[torch.device, torch.dtype], list[Case]],
        reference: Callable, ext: Callable, argv=None, default_dtype: dict | None = None) -> list[dict]:
    """Command-line entry shared by the benchmark scripts; returns the table rows."""
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions on CPU (CUDA: do_bench)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = ap.parse_args(argv)
    device = bench_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    timing = {} if device.type == "cuda" else {"warmup": 3, "reps": args.reps}
    impls = {"ext": ext, "eager": reference}

    dev = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {dev}; copy bandwidth {copy_gbs:.1f} GB/s; dtype {dtype_name}")
    rows = []
    for case in cases_for(device, dtype):
        ms_of: dict[tuple[str, str], float] = {}
        for prov in providers:
            if prov == "compile":
                torch._dynamo.reset()
                fn = torch.compile(reference, dynamic=False)
            elif prov in impls:
                fn = impls[prov]
            else:
                raise SystemExit(f"unknown provider {prov!r}; expected {PROVIDERS}")
            fns = timed_fns(fn, case)
            for mode in modes:
                fns[mode]()  # compile / warm up outside the timing
                ms = measure_ms(fns[mode], device, **timing)
                ms_of[(prov, mode)] = ms
                nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd,
                          "fwd+bwd": case.bytes_fwd + case.bytes_bwd}[mode]
                rows.append({"case": case.name, "dtype": dtype_name, "mode": mode, "provider": prov, "ms": ms,
                             "GB/s": nbytes / ms / 1e6, "%copy": 100 * nbytes / ms / 1e6 / copy_gbs})
            del fns
        for row in rows:
            if row["case"] == case.name:
                for base in ("eager", "compile"):
                    if (base, row["mode"]) in ms_of:
                        row[f"x_{base}"] = ms_of[(base, row["mode"])] / row["ms"]
    cols = ["case", "dtype", "mode", "provider", "ms", "GB/s", "%copy", "x_eager", "x_compile"]
    print(markdown_table(rows, cols, title=f"{title} on {dev} (copy {copy_gbs:.1f} GB/s)"))
    if not args.no_save:
        folder = write_results(result_name, [{**r, "copy_GB/s": copy_gbs} for r in rows], device)
        print(f"wrote {folder}/{result_name}.csv and .md")
    return rows
