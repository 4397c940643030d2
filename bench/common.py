"""Shared benchmark harness: timing, peak memory, result tables tagged with the device name.

GPU: `triton.testing.do_bench` medians (it flushes the L2 cache and synchronises). CPU: the median of
repeated wall-clock runs after warm-up. Every table row carries the device it was measured on, and
`write_results` stores CSV + markdown under bench/results/<device>/.
"""
from __future__ import annotations

import csv
import os
import platform
import re
import statistics
import time
from pathlib import Path
from collections.abc import Callable

import torch

# where tables go; UNIGENDET_BENCH_RESULTS redirects them (e.g. to $OUT on a lent GPU machine)
RESULTS = Path(os.environ.get("UNIGENDET_BENCH_RESULTS", Path(__file__).parent / "results"))


def device_name(device: torch.device | str) -> str:
    """A human-readable device name: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def bench_device(name: str) -> torch.device:
    """`auto` | `cuda` | `cpu` -> the device to benchmark on. On CPU, Triton kernels can only run on
    the interpreter, so TRITON_INTERPRET=1 is set here, before any kernel module is imported."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def measure_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_interleaved_ms(fns: dict[str, Callable[[], object]], *, warmup: int = 3,
                           reps: int = 10) -> dict[str, float]:
    """CPU: median milliseconds of each fn, timed round-robin (one call of each per round) so that
    the slow drift of a shared machine affects every provider alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth_gbs(device: torch.device | str) -> float:
    """GB/s of a large device copy (bytes read + bytes written): the ceiling of memory-bound ops."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak GPU memory (MiB) allocated while fn() runs, above what was allocated before; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def write_results(name: str, rows: list[dict], device: torch.device | str,
                  plot: tuple[str, list[str]] | None = None) -> Path:
    """Write rows as bench/results/<device>/<name>.csv and .md (and <name>.png when `plot` names the
    value column and the grouping columns of a bar chart, one bar per provider); returns the folder.

    Each call replaces the files with a table of exactly `rows`, so a benchmark calls it again after
    each measured case with all rows so far: a run cut short (a time limit) keeps what finished, and
    a complete run ends with the complete table. Files are written beside and renamed into place
    (os.replace), so a run killed mid-write leaves the previous complete file, never a truncated one."""
    dev = device_name(device)
    folder = RESULTS / slug(dev)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"device": dev, **r} for r in rows]
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def tmp(ext: str) -> Path:
        return folder / f"{name}.{ext}.tmp"

    with open(tmp("csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp("csv"), folder / f"{name}.csv")
    tmp("md").write_text(markdown_table(rows, cols, title=f"{name} on {dev}"))
    os.replace(tmp("md"), folder / f"{name}.md")
    if plot is not None:
        from bench.plot import bar_chart

        value, group_by = plot
        if bar_chart(rows, value, group_by, tmp("png"), title=f"{name}: {value} on {dev}") is not None:
            os.replace(tmp("png"), folder / f"{name}.png")
    return folder


def add_ratio_to(rows: list[dict], base: str, same: tuple[str, ...], column: str) -> None:
    """rows[column] = row ms / ms of the `base` provider's row that agrees on the `same` columns (> 1: the
    base is faster); rows with no such base row get none. Recomputed in place, so it can follow each
    measurement of a table that grows."""
    def key(r):
        return tuple(r[k] for k in same)

    base_ms = {key(r): r["ms"] for r in rows if r["provider"] == base}
    for r in rows:
        if key(r) in base_ms:
            r[column] = r["ms"] / base_ms[key(r)]


def markdown_table(rows: list[dict], cols: list[str], title: str = "") -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
