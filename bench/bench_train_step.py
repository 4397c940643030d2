"""Benchmark one training step of the engine: ms per step and samples/s per backend choice.

    python bench/bench_train_step.py                  # tiny_cpu here; small_gpu on a GPU
    python bench/bench_train_step.py --config tiny_cpu --steps 30

Each provider builds a Trainer on the embedded demo data (written once to a temporary folder) and
times `Trainer.step()` (phase alternation, fake-pool refills, forward, backward, fused AdamW, EMA,
device-side non-finite check) after warm-up steps; the pool refill cost is part of the step, as in
training. Providers:
  reference  every op on the eager reference (`ops.backend = reference`)
  fused      `ops.backend = auto`: the extension (CPU, CUDA) and the Triton kernels (CUDA only)
Not yet implemented (issue 7): `train.compile` and `train.cuda_graphs`; the table says so instead of
leaving rows out. MFU is reported on GPUs with a known bf16 peak (unigendet.train.throughput).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_device, device_name, markdown_table, write_results  # noqa: E402
from unigendet import load_config, ops  # noqa: E402
from unigendet.data import write_demo_dataset  # noqa: E402
from unigendet.train import Trainer  # noqa: E402
from unigendet.train.throughput import device_peak_flops, train_flops_per_sample  # noqa: E402

PROVIDERS = {"reference": "reference", "fused": "auto"}
NOT_IMPLEMENTED = ("reference+compile", "fused+cuda_graphs")


def time_steps(cfg, warmup: int, steps: int, device: torch.device) -> list[float]:
    trainer = Trainer(cfg, log=lambda *_: None)
    for _ in range(warmup):
        trainer.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--config", default=None, help="default: small_gpu on CUDA, tiny_cpu on CPU")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per provider")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = bench_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    config = args.config or ("small_gpu" if device.type == "cuda" else "tiny_cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_dataset(Path(tmp) / "demo", seed=0)
        for name, backend in PROVIDERS.items():
            cfg = load_config(config, [f"--data.root={tmp}/demo/train", f"--train.out_dir={tmp}/run-{name}",
                                       f"--train.device={device.type}", f"--ops.backend={backend}",
                                       "--train.progress=false", "--data.num_workers=0"])
            try:
                times = time_steps(cfg, args.warmup, args.steps, device)
            finally:
                ops.set_default_backend("auto")
            ms = statistics.median(times)
            rate = cfg.train.batch_size / ms * 1e3
            peak = device_peak_flops(device)
            rows.append({"config": config, "provider": name, "ms_per_step": ms, "samples_per_s": rate,
                         "mfu": rate * train_flops_per_sample(cfg.model) / peak if peak else None})
    base = {r["provider"]: r["ms_per_step"] for r in rows}
    for r in rows:
        r["x_reference"] = base["reference"] / r["ms_per_step"]
    rows += [{"config": config, "provider": name, "ms_per_step": None, "samples_per_s": None, "mfu": None,
              "x_reference": None, "note": "not implemented yet (issue 7)"} for name in NOT_IMPLEMENTED]
    dev = device_name(device)
    cols = ["config", "provider", "ms_per_step", "samples_per_s", "x_reference", "mfu", "note"]
    print(markdown_table(rows, cols, title=f"train step ({config}) on {dev}"))
    if not args.no_save:
        folder = write_results("bench_train_step", rows, device, plot=("samples_per_s", ["config"]))
        print(f"wrote {folder}/bench_train_step.csv and .md")
    return rows


if __name__ == "__main__":
    main()
