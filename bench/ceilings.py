"""The device's ceilings that the benchmark tables are judged against.

    python -m bench.ceilings --device cuda      # copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s)
    python -m bench.ceilings --device cpu       # the same on the CPU (fp32 matmul)

Copy bandwidth: a large `copy_` (bytes read + written), the ceiling of memory-bound ops (rmsnorm,
swiglu, rope, loss). Matmul rate: square matmuls of 8192 (CUDA, bf16) or 2048 (CPU, fp32),
2 n^3 FLOPs each, the ceiling of the attention kernels and of MFU.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import (bench_device, copy_bandwidth_gbs, device_name, markdown_table, measure_ms,
                          write_results)


def matmul_tflops(device: torch.device) -> tuple[float, str, int]:
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = measure_ms(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9, str(dtype).replace("torch.", ""), n


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = bench_device(args.device)
    tflops, dtype, n = matmul_tflops(device)
    rows = [{"ceiling": "copy bandwidth", "value": copy_bandwidth_gbs(device), "unit": "GB/s", "note": "read + write"},
            {"ceiling": "matmul", "value": tflops, "unit": "TFLOP/s", "note": f"{dtype}, {n}^3"}]
    dev = device_name(device)
    print(markdown_table(rows, ["ceiling", "value", "unit", "note"], title=f"ceilings of {dev}"))
    if not args.no_save:
        print(f"wrote {write_results('ceilings', rows, device)}/ceilings.csv and .md")
    return rows


if __name__ == "__main__":
    main()
