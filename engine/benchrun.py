"""`unigendet bench`: run the per-op benchmarks of a source checkout and summarise their tables.

Each benchmark runs as its own process (`python -m bench.bench_<op> --device D`, from the checkout's
root): a clean allocator and compile cache per benchmark, and torch's CPU allocator configured before
torch loads (the memory-bound benchmarks use THP_MEM_ALLOC_ENABLE, see bench/membound.py). Their CSV, markdown and
PNG files land in bench/results/<device-name>/ (or UNIGENDET_BENCH_RESULTS / --out); this command
then writes summary.md there, concatenating the tables it just produced, and prints it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_OPS = ("attention", "loss", "rmsnorm", "swiglu", "rope", "train_step", "data")


class BenchError(RuntimeError):
    """Bad arguments, or no bench/ folder next to the package (not a source checkout)."""


def bench_dir() -> Path:
    folder = Path(__file__).resolve().parent.parent / "bench"
    if not (folder / "common.py").is_file():
        raise BenchError(f"unigendet bench runs the benchmark scripts of a source checkout; {folder} does not "
                         "hold them (install with `pip install -e .` from a clone)")
    return folder


def run_benchmarks(ops: list[str], device: str, out: str | None = None, log=print) -> int:
    """Run each op's benchmark; returns the number that failed. Writes <results>/<device>/summary.md."""
    unknown = [op for op in ops if op not in BENCH_OPS]
    if unknown:
        raise BenchError(f"--ops: unknown {', '.join(unknown)}; choose from {', '.join(BENCH_OPS)}")
    if device not in ("auto", "cpu", "cuda"):
        raise BenchError(f"--device {device!r}: expected auto, cpu or cuda")
    folder = bench_dir()
    env = {**os.environ}
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if out:
        env["UNIGENDET_BENCH_RESULTS"] = str(Path(out).resolve())
    results = Path(env.get("UNIGENDET_BENCH_RESULTS", folder / "results"))
    started, failed, tables = time.time(), [], []
    for op in ops:
        log(f"== bench_{op} ({device})")
        proc = subprocess.run([sys.executable, "-m", f"bench.bench_{op}", "--device", device], env=env,
                              cwd=folder.parent)
        written = sorted(results.glob(f"*/bench_{op}.md"), key=lambda p: p.stat().st_mtime)
        if proc.returncode != 0 or not written or written[-1].stat().st_mtime < started:
            failed.append(op)
            log(f"bench_{op} FAILED (exit code {proc.returncode})")
            continue
        tables.append(written[-1])
    if tables:
        summary = tables[-1].parent / "summary.md"
        summary.write_text("\n".join(t.read_text() for t in tables))
        log(f"\n{summary.read_text()}\nwrote {summary}")
    return len(failed)
