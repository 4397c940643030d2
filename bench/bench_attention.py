"""Benchmark `mmsa_attention`: forward, backward, forward+backward; ms, TFLOP/s, peak memory.

    python -m bench.bench_attention --device cuda     # the GPU table (bench/results/<gpu>/bench_attention.*)
    python -m bench.bench_attention --device cpu      # the CPU table: the tiny_cpu training shape, fp32

Providers:
  ours        the Triton kernels (`backend="triton"`); on CPU through the Triton interpreter
  eager       `ops.reference.mmsa_attention_ref` (per stream-pair scores, fp32 softmax)
  sdpa        the CPU backend (`backend="sdpa"`): PyTorch's fused CPU flash-attention kernel per stream
              block, merged by log-sum-exps (CPU only)
  ext         the C++ CPU kernels (`backend="ext"`, csrc/cpu/attention.h): both streams in one call, scores
              of a head materialised in a thread-local buffer (CPU only)
  sdpa_dense  the published UniGenDet way: concatenate the streams, build the dense boolean mask,
              SDPA (`ops.reference.mmsa_attention_dense`; concatenation and mask are timed)
  flex        torch.compile(flex_attention) on pre-concatenated (B, H, T, D) inputs with the MMSA
              mask_mod (block mask built once, outside the timing: FlexAttention's best case)
  fa2         flash_attn_func on pre-concatenated inputs: only where flash-attn is installed and the
              mask is full (bidirectional layout, no causal stream, no padding)
FLOPs count only the (query, key) pairs the layout allows: forward 4 * D per pair per head (QK^T
and PV), backward 2.5x forward (FlashAttention's convention: 5 matmuls vs 2; our dQ pass recomputes
QK^T and dO V^T, i.e. 7 matmuls, which is not counted), forward+backward 3.5x. Backward alone is
timed as `torch.autograd.grad` of the outputs of one forward (retain_graph). Peak memory: what the
timed call allocates above its inputs (CUDA only).
Targets (the project's goals; H100/H200, bf16, published shape): forward >= 450 TFLOP/s, forward+backward >= 300,
>= 1.3x compiled FlexAttention and >= 5x dense-mask SDPA; memory linear in T.
"""
from __future__ import annotations

import argparse
import warnings

import torch

from bench.common import (add_ratio_to, bench_device, device_name, markdown_table, measure_ms,
                          peak_memory_mb, write_results)

# (name, B, Tg, Td, H, Hkv, D); the published shape (the one the goals name) first, so that a run cut short by a
# time limit has it (the table is rewritten after every measurement)
CUDA_SHAPES = [("published", 1, 4096, 4096, 28, 4, 128), ("B4-T1024-H16-D64", 4, 1024, 1024, 16, 16, 64)]
# CPU: the tiny_cpu training step's attention (32 px images, patch 4: 64 G tokens, + 4 registers on D;
# width 96, 4 heads of 24, 2 KV heads), the same at twice the batch (the pool refill's), a longer sequence
CPU_SHAPES = [("tiny_cpu", 16, 64, 68, 4, 2, 24), ("tiny_cpu-refill", 32, 64, 68, 4, 2, 24),
              ("B2-T256-H4-D32", 2, 256, 260, 4, 2, 32)]
CPU_PROVIDERS = "eager,ext,sdpa,sdpa_dense,flex"  # `ours` (Triton) runs on the interpreter there: not a speed
LAYOUTS = {"bidirectional": dict(g2d=True, d2g=True), "published": dict(g2d=False, d2g=True)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def allowed_pairs(Tg: int, Td: int, *, g2d: bool, d2g: bool, g_causal: bool = False, d_causal: bool = False) -> int:
    """(query, key) pairs MMSA computes per head per sample (no padding)."""
    own = lambda T, causal: T * (T + 1) // 2 if causal else T * T  # noqa: E731
    return own(Tg, g_causal) + own(Td, d_causal) + (Tg * Td if g2d else 0) + (Td * Tg if d2g else 0)


def make_inputs(B, Tg, Td, H, Hkv, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(B, Tg, H, D), (B, Tg, Hkv, D), (B, Tg, Hkv, D), (B, Td, H, D), (B, Td, Hkv, D), (B, Td, Hkv, D)]
    return [torch.randn(s, generator=g, device=device, dtype=dtype).requires_grad_() for s in shapes]


def _concat(inputs):
    """(B, T, H, D) per stream -> leaf tensors over the concatenated streams [G; D], (B, T, H, D)."""
    q_g, k_g, v_g, q_d, k_d, v_d = inputs
    pairs = ((q_g, q_d), (k_g, k_d), (v_g, v_d))
    return [torch.cat([a, b], 1).detach().contiguous().requires_grad_() for a, b in pairs]


_COMPILED = {}


def _compiled(fn):
    """One torch.compile wrapper per function for the whole run (main resets dynamo per shape)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def provider(name: str, inputs, layout: dict, device):
    """-> (forward callable returning a list of outputs, its leaf inputs) or raises SystemError(reason)."""
    from unigendet import ops
    from unigendet.ops.reference import mmsa_attention_dense, mmsa_attention_ref

    if name == "ours":
        return (lambda: list(ops.mmsa_attention(*inputs, backend="triton", **layout))), inputs
    if name == "eager":
        return (lambda: list(mmsa_attention_ref(*inputs, **layout))), inputs
    if name == "sdpa":
        if device.type != "cpu":
            raise SystemError("the sdpa backend is CPU only")
        return (lambda: list(ops.mmsa_attention(*inputs, backend="sdpa", **layout))), inputs
    if name == "ext":
        if device.type != "cpu":
            raise SystemError("the ext attention kernels are CPU only")
        return (lambda: list(ops.mmsa_attention(*inputs, backend="ext", **layout))), inputs
    if name == "sdpa_dense":
        return (lambda: list(mmsa_attention_dense(*inputs, **layout))), inputs
    B, Tg, H, D = inputs[0].shape
    Td = inputs[3].shape[1]
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # the layout's switches as 0-d tensors, not Python bools: dynamo guards on a closure's constants,
        # so bools would recompile flex_attention for each layout; with tensors both layouts share a compile
        g2d, d2g = (torch.tensor(layout[s], device=device) for s in ("g2d", "d2g"))

        def mask_mod(b, h, qi, ki):
            q_is_g, k_is_g = qi < Tg, ki < Tg
            return (q_is_g == k_is_g) | (q_is_g & g2d) | (~q_is_g & d2g)

        T = Tg + Td
        mask = create_block_mask(mask_mod, B, None, T, T, device=device)
        q, k, v = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in _concat(inputs)]  # (B, H, T, D)
        flex = _compiled(flex_attention)
        gqa = k.shape[1] != q.shape[1]
        # no_grad (fwd mode): detached inputs, so CPU FlexAttention (forward only) runs too
        grad_or_detached = lambda x: x if torch.is_grad_enabled() else x.detach()  # noqa: E731
        return (lambda: [flex(*map(grad_or_detached, (q, k, v)), block_mask=mask, enable_gqa=gqa)]), [q, k, v]
    if name == "fa2":
        if not (layout["g2d"] and layout["d2g"]):
            raise SystemError("mask not full (FlashAttention-2 has no MMSA block mask)")
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise SystemError(f"flash-attn not installed ({e.__class__.__name__})") from None
        if device.type != "cuda":
            raise SystemError("flash-attn needs CUDA")
        q, k, v = _concat(inputs)
        return (lambda: [flash_attn_func(q, k, v)]), [q, k, v]
    raise SystemExit(f"unknown provider {name!r}")


def timed_fn(fwd, leaves, mode: str):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run
    if mode == "fwd+bwd":
        grads_out = [torch.randn_like(o) for o in fwd()]
        return lambda: torch.autograd.grad(fwd(), leaves, grads_out)
    outs = fwd()  # bwd: one forward, backward timed repeatedly
    grads_out = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, leaves, grads_out, retain_graph=True)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--providers", default=None, help=f"default: ours,eager,sdpa_dense,flex,fa2 on CUDA, "
                    f"{CPU_PROVIDERS} on CPU")
    ap.add_argument("--layouts", default="published,bidirectional")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--shapes", default="", help="B:Tg:Td:H:Hkv:D,... (default: the device's shape set)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = ap.parse_args(argv)
    device = bench_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = ([("custom",) + tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes
              else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES))
    providers = [p for p in (args.providers or ("ours,eager,sdpa_dense,flex,fa2" if device.type == "cuda"
                                                 else CPU_PROVIDERS)).split(",") if p]
    base = "ours" if "ours" in providers else "eager"  # the ratio column's baseline
    modes = [m for m in args.modes.split(",") if m]
    timing = {} if device.type == "cuda" else {"warmup": 2, "reps": 10}
    dev = device_name(device)
    print(f"device: {dev}; dtype {dtype}; torch {torch.__version__}")
    if device.type == "cpu" and "ours" in providers:
        print("CPU: `ours` runs on the Triton interpreter (correct, not fast): its numbers only show the "
              "script works")
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    rows, skipped = [], []

    def save():  # after every measurement: a run cut short keeps what finished
        add_ratio_to(rows, base, ("shape", "B", "Tg", "Td", "H", "Hkv", "D", "layout", "dtype", "mode"),
                     f"x_vs_{base}")
        if not args.no_save:
            return write_results("bench_attention", rows, device, plot=("TFLOP/s", ["shape", "layout", "mode"]))

    for shape_name, B, Tg, Td, H, Hkv, D in shapes:
        if "flex" in providers:
            torch._dynamo.reset()  # a new shape recompiles anyway; keeps dynamo's cache under its limit
        for lname in [s for s in args.layouts.split(",") if s]:
            layout = LAYOUTS[lname]
            pairs = allowed_pairs(Tg, Td, **layout)
            fwd_flops = 4.0 * D * pairs * B * H
            inputs = make_inputs(B, Tg, Td, H, Hkv, D, dtype, device)
            for prov in providers:
                try:
                    fwd, leaves = provider(prov, inputs, layout, device)
                except SystemError as e:
                    skipped.append(f"{prov} {shape_name} {lname}: {e}")
                    continue
                for mode in modes:
                    try:
                        fn = timed_fn(fwd, leaves, mode)
                        fn()  # compile / autotune / warm up outside the timing
                        ms = measure_ms(fn, device, **timing)
                        peak = peak_memory_mb(fn, device)
                    except (torch.OutOfMemoryError, RuntimeError, NotImplementedError) as e:
                        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                        skipped.append(f"{prov} {shape_name} {lname} {mode}: {type(e).__name__}: {msg}")
                        print(f"skipped: {skipped[-1]}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    rows.append({"shape": shape_name, "B": B, "Tg": Tg, "Td": Td, "H": H, "Hkv": Hkv, "D": D,
                                 "layout": lname, "dtype": str(dtype).replace("torch.", ""), "provider": prov,
                                 "mode": mode, "ms": ms, "TFLOP/s": fwd_flops * FLOP_FACTOR[mode] / ms / 1e9,
                                 "peak_MiB": peak})
                    print(f"{shape_name} {lname} {prov} {mode}: {ms:.4g} ms, {rows[-1]['TFLOP/s']:.4g} TFLOP/s",
                          flush=True)
                    save()
                    del fn
                del fwd, leaves
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del inputs
    cols = ["shape", "B", "Tg", "Td", "H", "Hkv", "D", "layout", "dtype", "provider", "mode", "ms", "TFLOP/s",
            "peak_MiB", f"x_vs_{base}"]
    print(markdown_table(rows, cols, title=f"mmsa_attention on {dev}"))
    for s in skipped:
        print(f"skipped: {s}")
    if device.type == "cuda":
        print(targets_report(rows))
    if not args.no_save:
        print(f"wrote {save()}/bench_attention.csv and .md")  # also when nothing was measured
    return rows


def targets_report(rows: list[dict]) -> str:
    """The project's goals at the published shape, bf16, per layout."""
    lines = ["targets (published shape):"]
    get = lambda lay, prov, mode: next((r for r in rows if r["shape"] == "published" and r["layout"] == lay  # noqa
                                        and r["provider"] == prov and r["mode"] == mode), None)
    for lay in LAYOUTS:
        f, fb = get(lay, "ours", "fwd"), get(lay, "ours", "fwd+bwd")
        if f is None or fb is None:
            continue
        checks = [f"fwd {f['TFLOP/s']:.0f} TFLOP/s (>= 450)", f"fwd+bwd {fb['TFLOP/s']:.0f} TFLOP/s (>= 300)"]
        for prov, need in (("flex", 1.3), ("sdpa_dense", 5.0)):
            r = get(lay, prov, "fwd+bwd")
            if r is not None:
                checks.append(f"{r['x_vs_ours']:.2f}x {prov} fwd+bwd (>= {need})")
        lines.append(f"  {lay}: " + "; ".join(checks))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
