"""Benchmark one training step of the engine: ms per step and samples/s per backend choice.

    python -m bench.bench_train_step                  # tiny_cpu here; small_gpu on a GPU
    python -m bench.bench_train_step --config tiny_cpu --steps 30 --model.depth=2   # config overrides too

Each provider builds a Trainer on the embedded demo data (written once to a temporary folder); the
trainers step round-robin and each `Trainer.step()` is timed (phase alternation, fake-pool refills,
forward, backward, fused AdamW, EMA, device-side non-finite check) after warm-up steps; the pool
refill cost is part of the step, as in training. Images load inside the timed step on a CPU
(data.num_workers = 0: loader processes would compete with the compute threads); on a GPU the
config's loader workers prepare them ahead, as in training. The table is rewritten after every timed
round (--name: its file name). Providers:
  reference          every op on the eager reference (`ops.backend = reference`)
  reference+compile  the same with `train.compile = true` (warm-up steps cover each phase's compile)
  fused              `ops.backend = auto`: the extension (CPU, CUDA), the Triton kernels (CUDA only) and the
                     sdpa attention (CPU only)
  fused+compile      the same with `train.compile = true`: the fused custom ops stay opaque in the graphs
  fused+cuda_graphs  the same with `train.cuda_graphs = true` (CUDA only: each phase step and the pool
                     refill captured after 3 warm-up calls; on a CPU the row says so instead of a number)
MFU is reported on GPUs with a known bf16 peak (unigendet.train.throughput). first_step_s is each
provider's first step (its compile, when it compiles; inductor's graph cache makes a rerun's shorter).

    python -m bench.bench_train_step --latent        # the latent-space rows, table bench_train_step_latent

--latent times a latent config's step split into the VAE's encode and decode (forward, and the backward
of L_auth's decode), the refill's sampler, the optimizer and the model (bench/step_split.py), so the
VAE's share is visible: `tiny_latent_cpu` on a CPU (tiny_cpu with the tiny random VAE of
tests/tiny_vae.py) and `base_256` on a GPU (engine/configs/base_256.toml with a random-initialised
VAE of the FLUX VAE's shape: the same FLOPs as the real one, no download). Each device's row of the
other says why it is not measured there. Needs diffusers (the vae extra).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import bench_device, device_name, markdown_table, write_results
from unigendet import load_config, ops
from unigendet.data import write_demo_dataset
from unigendet.train import Trainer
from unigendet.train.estimate import estimate
from unigendet.train.throughput import device_peak_flops, train_flops_per_sample

# name -> (ops.backend, train.compile, train.cuda_graphs)
PROVIDERS = {"reference": ("reference", False, False), "reference+compile": ("reference", True, False),
             "fused": ("auto", False, False), "fused+compile": ("auto", True, False),
             "fused+cuda_graphs": ("auto", False, True)}


def time_steps(cfgs: dict, warmup: int, steps: int, device: torch.device,
               on_round: Callable[[dict], object] | None = None,
               first_step_s: dict[str, float] | None = None) -> dict[str, list[float]]:
    """ms of each step, per provider. The providers' trainers step round-robin (one step of each per
    round), so that the drift of a shared machine hits them alike; the op backend is a process-wide
    setting, so it is set to each trainer's choice before its step. `on_round(times)` is called after
    each timed round (outside the timing); `first_step_s` gets each provider's first step in seconds."""
    t_start = time.perf_counter()
    trainers = {}
    for name, cfg in cfgs.items():
        trainers[name] = Trainer(cfg, log=lambda *_: None)
    print(f"trainers built ({', '.join(trainers)}): {time.perf_counter() - t_start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    try:
        for i in range(warmup + steps):
            for name, trainer in trainers.items():
                ops.set_default_backend(cfgs[name].ops.backend)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                trainer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                elif i == 0 and first_step_s is not None:
                    first_step_s[name] = time.perf_counter() - t0
            if i + 1 == warmup:
                print(f"warm-up ({warmup} steps each, compiles and captures included) done: "
                      f"{time.perf_counter() - t_start:.1f} s", flush=True)
            if i >= warmup and on_round is not None:
                on_round(times)
    finally:
        ops.set_default_backend("auto")
    return times


# latent rows: name -> (device type it runs on, config, overrides besides the VAE folder)
LATENT_ROWS = {
    "tiny_latent_cpu": ("cpu", "tiny_cpu", ["--model.g2d=false", "--model.d2g=true", "--data.crop=center"]),
    "base_256": ("cuda", "base_256", ["--model.latent_channels=0", "--model.latent_downsample=0"]),
}
LATENT_COLS = ["config", "ms_per_step", "samples_per_s", "vae_share", "vae_encode_ms", "vae_decode_fwd_ms",
               "vae_decode_bwd_ms", "refill_model_ms", "model_ms", "optimizer_ms", "mfu", "mfu_with_vae", "note"]


def random_vae(folder: Path, like: str) -> Path:
    """A random-initialised AutoencoderKL saved to `folder`: the tiny test VAE, or the FLUX VAE's shape
    (16 latent channels, blocks 128-256-512-512; its FLOPs, not its weights)."""
    if like == "tiny":
        from tests.tiny_vae import make_tiny_vae

        return make_tiny_vae(folder)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                  shift_factor=0.1159).save_pretrained(folder)
    return folder


def latent_rows(device: torch.device, data_root: Path, tmp: Path, warmup: int, steps: int,
                overrides: list[str], save) -> list[dict]:
    """The latent rows (module docstring): ms per step and its split, one row per LATENT_ROWS entry."""
    from bench.step_split import StepSplit

    rows = []
    for name, (kind, config, extra) in LATENT_ROWS.items():
        if kind != device.type:
            why = "needs a CUDA device" if kind == "cuda" else "the CPU row: run with --device cpu"
            rows.append({"config": name, "note": why})
            continue
        try:
            vae = random_vae(tmp / f"vae-{name}", "tiny" if kind == "cpu" else "flux")
        except ImportError as e:
            rows.append({"config": name, "note": f"needs diffusers (the vae extra): {e}"})
            continue
        cfg = load_config(config, [f"--data.root={data_root}", f"--train.out_dir={tmp}/run-{name}",
                                   f"--train.device={device.type}", f"--model.vae={vae}", "--train.progress=false",
                                   *(["--data.num_workers=0"] if device.type == "cpu" else []), *extra, *overrides])
        trainer = Trainer(cfg, log=lambda *_: None)
        split = StepSplit(trainer)
        for _ in range(warmup):
            trainer.step()
        split.reset()
        for _ in range(steps):
            trainer.step()
        ms = split.means_ms(steps)
        rate = cfg.train.batch_size / ms["step"] * 1e3
        est, peak = estimate(cfg), device_peak_flops(device)
        vae_ms = ms["vae_encode"] + ms["vae_decode_fwd"] + ms["vae_decode_bwd"]
        vae_flops = est.flops["vae_decode"] + est.flops["vae_encode"] + est.flops["vae_encode_detect"]  # not packed
        rows.append({"config": name, "ms_per_step": ms["step"], "samples_per_s": rate,
                     "vae_share": vae_ms / ms["step"], **{f"{k}_ms": v for k, v in ms.items() if k != "step"},
                     "mfu": rate * train_flops_per_sample(cfg.model) / peak if peak else None,
                     "mfu_with_vae": rate * (train_flops_per_sample(cfg.model) + vae_flops) / peak if peak else None,
                     "note": f"{steps} steps after {warmup} warm-up, batch {cfg.train.batch_size}, random VAE"})
        save(rows)
        del trainer, split
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--config", default=None, help="default: small_gpu on CUDA, tiny_cpu on CPU")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per provider")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps (>= 8: graphs capture at each phase's 4th)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {', '.join(PROVIDERS)}")
    ap.add_argument("--name", default="bench_train_step", help="the table's name under bench/results/<device>/")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default min(4, cores))")
    ap.add_argument("--latent", action="store_true", help="the latent rows with their time split instead "
                    "(tiny_latent_cpu on a CPU, base_256 on a GPU; table bench_train_step_latent)")
    args, overrides = ap.parse_known_args(argv)  # the rest: --section.key=value config overrides
    device = bench_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    config = args.config or ("small_gpu" if device.type == "cuda" else "tiny_cpu")
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_dataset(Path(tmp) / "demo", seed=0)
        if args.latent:
            return run_latent(args, device, Path(tmp), overrides)
        chosen = [p for p in args.providers.split(",") if p]
        unknown = set(chosen) - set(PROVIDERS)
        if unknown or "reference" not in chosen:
            raise SystemExit(f"--providers: need 'reference' and names from {list(PROVIDERS)}; got {chosen}")
        cfgs, skipped = {}, []
        # CPU: loader processes would compete with the compute threads, so images load in the timed step;
        # GPU: the config's loader workers prepare batches ahead, as in training
        cpu_only = ["--data.num_workers=0"] if device.type == "cpu" else []
        for name in chosen:
            backend, compile_, graphs = PROVIDERS[name]
            if graphs and device.type != "cuda":
                skipped.append({"config": config, "provider": name, "ms_per_step": None, "samples_per_s": None,
                                "mfu": None, "x_reference": None, "note": "needs a CUDA device"})
                continue
            cfgs[name] = load_config(config, [
                f"--data.root={tmp}/demo/train", f"--train.out_dir={tmp}/run-{name}",
                f"--train.device={device.type}", f"--ops.backend={backend}",
                f"--train.compile={str(compile_).lower()}", f"--train.cuda_graphs={str(graphs).lower()}",
                "--train.progress=false", *cpu_only, *overrides])
        peak = device_peak_flops(device)
        # the compiled trainers of one process share their code objects, so each one's graphs count
        # against dynamo's per-code-object recompile limit: room for all of them, or the last to compile
        # would fall back to eager frames and be timed so
        compiled = sum(1 for c in cfgs.values() if c.train.compile)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * compiled)

        def table(times: dict[str, list[float]]) -> list[dict]:
            """Rows of the medians so far, the skipped providers' rows last."""
            rows = []
            for name, cfg in cfgs.items():
                if times[name]:
                    ms = statistics.median(times[name])
                    rate = cfg.train.batch_size / ms * 1e3
                    rows.append({"config": config, "provider": name, "ms_per_step": ms, "samples_per_s": rate,
                                 "mfu": rate * train_flops_per_sample(cfg.model) / peak if peak else None,
                                 "first_step_s": first_step_s.get(name)})
            base = {r["provider"]: r["ms_per_step"] for r in rows}
            for r in rows:
                r["x_reference"] = base["reference"] / r["ms_per_step"]
            return rows + skipped

        def save(rows: list[dict]):
            if not args.no_save:
                return write_results(args.name, rows, device, plot=("samples_per_s", ["config"]))

        # the table is rewritten after every timed round: a run cut short by a time limit keeps the
        # medians of the steps it timed
        first_step_s: dict[str, float] = {}
        times = time_steps(cfgs, args.warmup, args.steps, device, on_round=lambda t: save(table(t)),
                           first_step_s=first_step_s)
        rows = table(times)
    dev = device_name(device)
    cols = ["config", "provider", "ms_per_step", "samples_per_s", "x_reference", "mfu", "first_step_s", "note"]
    print(markdown_table(rows, cols, title=f"train step ({config}) on {dev}"))
    if not args.no_save:
        print(f"wrote {save(rows)}/{args.name}.csv and .md")
    return rows


def run_latent(args, device: torch.device, tmp: Path, overrides: list[str]) -> list[dict]:
    name = args.name if args.name != "bench_train_step" else "bench_train_step_latent"

    def save(rows: list[dict]):
        if not args.no_save:
            return write_results(name, rows, device)

    rows = latent_rows(device, tmp / "demo" / "train", tmp, args.warmup, args.steps, overrides, save)
    save(rows)
    print(markdown_table(rows, LATENT_COLS, title=f"latent train step, split, on {device_name(device)}"))
    return rows


if __name__ == "__main__":
    main()
