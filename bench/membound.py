"""Harness of the memory-bound backbone-op benchmarks (bench_rmsnorm.py, bench_swiglu.py, bench_rope.py).

For each case and provider it times forward, backward and forward+backward (backward alone is
`torch.autograd.grad` of one forward's outputs with retain_graph), reports ms and GB/s from the bytes
that must move (each input read once, each output written once), `%copy` against the device's
measured copy bandwidth, and `x_eager` / `x_compile`: how many times faster than those providers.

Providers: `ext` (the extension unigendet._C), `eager` (the reference in ops/reference.py, eager
PyTorch), `compile` (torch.compile of the same reference, dynamic=False).

CPU page faults: every provider allocates fresh outputs, and on a VM first-touch page faults of
fresh 4 KiB pages cost several times the kernels themselves (measured here: 95 ms of faults in a
108 ms forward of fused_add_rmsnorm at N=8192, C=4096). This module therefore sets torch's
`THP_MEM_ALLOC_ENABLE=1` (2 MiB transparent huge pages for large CPU allocations; must be set before
torch is imported, so the scripts import this module first) for all providers alike; run with
`THP_MEM_ALLOC_ENABLE=0` to measure with 4 KiB pages. Tables record the setting in column `thp`.
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from bench.common import (bench_device, copy_bandwidth_gbs, device_name, markdown_table,  # noqa: E402
                          measure_interleaved_ms, measure_ms, write_results)

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
    if set(providers) - set(PROVIDERS):
        raise SystemExit(f"unknown provider in {providers}; expected {PROVIDERS}")
    modes = [m for m in args.modes.split(",") if m]
    timing = {} if device.type == "cuda" else {"warmup": 3, "reps": args.reps}
    impls = {"ext": ext, "eager": reference}

    dev = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") if device.type == "cpu" else None
    print(f"device: {dev}; copy bandwidth {copy_gbs:.1f} GB/s; dtype {dtype_name}; THP_MEM_ALLOC_ENABLE={thp}")
    rows = []

    def save():  # after every case (CUDA: every provider): a run cut short keeps what finished
        if not args.no_save:
            return write_results(result_name, [{**r, "copy_GB/s": copy_gbs} for r in rows], device,
                                 plot=("GB/s", ["case", "mode"]))

    def case_rows(case, ms_of):
        """The table rows of one case from what is measured so far ({(provider, mode): ms})."""
        out = []
        for prov in providers:
            for mode in modes:
                if (prov, mode) not in ms_of:
                    continue
                ms = ms_of[(prov, mode)]
                nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd,
                          "fwd+bwd": case.bytes_fwd + case.bytes_bwd}[mode]
                row = {"case": case.name, "dtype": dtype_name, "thp": thp, "mode": mode, "provider": prov,
                       "ms": ms, "GB/s": nbytes / ms / 1e6, "%copy": 100 * nbytes / ms / 1e6 / copy_gbs}
                for base in ("eager", "compile"):
                    if (base, mode) in ms_of:
                        row[f"x_{base}"] = ms_of[(base, mode)] / ms
                out.append(row)
        return out

    def forward_of(prov):
        if prov == "compile":
            return torch.compile(reference, dynamic=False)
        return impls[prov]

    for case in cases_for(device, dtype):
        done = len(rows)
        ms_of: dict[tuple[str, str], float] = {}
        if device.type == "cuda":
            # one provider at a time, in the order given (compile last by default), the table rewritten
            # after each: a compile cut short by a time limit leaves the others' rows
            for prov in providers:
                fns = timed_fns(forward_of(prov), case)
                for mode in modes:
                    fns[mode]()  # compile / warm up outside the timing
                    ms_of[(prov, mode)] = measure_ms(fns[mode], device)
                del fns
                rows[done:] = case_rows(case, ms_of)
                print(f"{case.name} {prov}: " + ", ".join(f"{m} {ms_of[(prov, m)]:.4g} ms" for m in modes),
                      flush=True)
                save()
        else:  # interleaved, so that the drift of a shared machine hits every provider alike
            fns_of = {prov: timed_fns(forward_of(prov), case) for prov in providers}
            for mode in modes:
                for fns in fns_of.values():
                    fns[mode]()  # compile / warm up outside the timing
                ms_of.update({(prov, mode): ms for prov, ms in measure_interleaved_ms(
                    {p: f[mode] for p, f in fns_of.items()}, **timing).items()})
            del fns_of
            rows[done:] = case_rows(case, ms_of)
            save()
        torch._dynamo.reset()
    cols = ["case", "dtype", "thp", "mode", "provider", "ms", "GB/s", "%copy", "x_eager", "x_compile"]
    print(markdown_table(rows, cols, title=f"{title} on {dev} (copy {copy_gbs:.1f} GB/s)"))
    if not args.no_save:
        print(f"wrote {save()}/{result_name}.csv and .md")  # also when nothing was measured
    return rows
