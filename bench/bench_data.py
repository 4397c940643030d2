"""Benchmark the training loaders: images/s of DALI against the PIL DataLoader on the demo data.

    python -m bench.bench_data --device cpu      # DALI CPU pipeline, 2 threads, vs PIL with 2 workers
    python -m bench.bench_data --device cuda     # DALI mixed (nvJPEG) decode vs PIL with 16 workers
    python -m bench.bench_data --device cuda --synthetic 10000 --source-size 512 --sizes 256
                                                 # the GPU goal's set: 10k fresh 512x512 JPEGs

Each provider builds its loader (the same files, crops and flips: see engine/data/loaders/dali.py), then
times `--batches` batches after `--warmup`, each landing in one preallocated input buffer as in the
trainer (DALI decodes into it, `write_into`; a PIL batch is copied into it), or with --fresh as
new tensors per batch; the two providers alternate for `--rounds` rounds and the
median rate is reported, so that the drift of a shared machine hits both alike. Sizes: 64 and 256
pixels (the GPU goal's), on the embedded demo dataset or, with --synthetic N, on N generated JPEGs of
--source-size pixels (smooth random images, quality 90; written in parallel to a temporary folder).
Targets (the project's goals): >= 1.5x PIL on this CPU; >= 5x on an H100/H200 machine at 256 pixels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import bench_device, device_name, markdown_table, write_results  # noqa: E402
from unigendet.data import build_loader, write_demo_dataset  # noqa: E402


def images_per_s(loader, warmup: int, batches: int, device: torch.device, fresh: bool = False) -> float:
    """Rate at which batches land in one preallocated (B, 3, S, S) float32 buffer on `device`, as in
    the trainer: DALI decodes straight into it (write_into), a PIL batch is copied into it.
    fresh=True: the rate of the loaders' own batches instead (a new tensor per batch, nothing copied)."""
    S = loader.image_size
    buffer = torch.empty((loader.batch_size, 3, S, S), device=device)
    direct = hasattr(loader, "write_into")
    if direct and not fresh:
        loader.write_into(buffer)
    it = iter(loader)

    def step():
        batch = next(it)
        if not direct and not fresh:
            buffer.copy_(batch.images, non_blocking=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * loader.batch_size / (time.perf_counter() - t0)


def _write_jpeg(job: tuple[Path, int, int]) -> None:
    """One synthetic photo-like JPEG: smooth random colour fields plus fine noise, size x size."""
    import numpy as np
    from PIL import Image

    path, seed, size = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_synthetic_jpegs(root: Path, count: int, size: int) -> Path:
    """root/real/NNNNNN.jpg for NNNNNN < count (a folder dataset of real images only); returns root."""
    from multiprocessing import Pool

    (root / "real").mkdir(parents=True)
    jobs = [(root / "real" / f"{i:06d}.jpg", i, size) for i in range(count)]
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    return root


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=25, help="timed batches (25 + 3 warm-up: within one demo epoch)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="PIL workers = DALI threads (default 2 CPU, 16 GPU)")
    ap.add_argument("--synthetic", type=int, default=0, help="N > 0: time on N generated JPEGs, not the demo data")
    ap.add_argument("--source-size", type=int, default=512, help="pixel size of the --synthetic JPEGs")
    ap.add_argument("--fresh", action="store_true",
                    help="time the loaders' own batches (a new tensor each) instead of delivery into one buffer")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = bench_device(args.device)
    workers = args.workers or (16 if device.type == "cuda" else 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic > 0:
            root = write_synthetic_jpegs(Path(tmp) / "synthetic", args.synthetic, args.source_size)
            source = f"{args.synthetic} JPEGs {args.source_size}px"
        else:
            write_demo_dataset(Path(tmp) / "demo", seed=0)
            root, source = Path(tmp) / "demo" / "train", "demo"
        for size in (int(s) for s in args.sizes.split(",")):
            rates: dict[str, list[float]] = {"pil": [], "dali": []}
            for _ in range(args.rounds):
                for name in rates:
                    loader = build_loader(root, size, args.batch_size, seed=0, num_workers=workers, loader=name,
                                          device=str(device), pin_memory=device.type == "cuda")
                    rates[name].append(images_per_s(loader, args.warmup, args.batches, device, args.fresh))
                    del loader
            for name, values in rates.items():
                rows.append({"data": source, "into": "new tensors" if args.fresh else "step buffer",
                             "size": size, "provider": name, "workers_or_threads": workers,
                             "images_per_s": statistics.median(values)})
            rows[-1]["x_pil"] = rows[-1]["images_per_s"] / rows[-2]["images_per_s"]
            rows[-2]["x_pil"] = 1.0
    dev = device_name(device)
    cols = ["data", "into", "size", "provider", "workers_or_threads", "images_per_s", "x_pil"]
    print(markdown_table(rows, cols, title=f"loaders on {dev}"))
    if not args.no_save:
        name = "bench_data_fresh" if args.fresh else "bench_data"
        folder = write_results(name, rows, device, plot=("images_per_s", ["size"]))
        print(f"wrote {folder}/{name}.csv and .md")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the loaders' own threads do the work
    main()
