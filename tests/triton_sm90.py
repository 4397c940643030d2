"""Compile every Triton kernel of unigendet for sm_90 (H100/H200) without a GPU.

    python tests/triton_sm90.py            # one line per compiled kernel variant; exit 1 on a failure

The interpreter tests check what the kernels compute; this checks that Triton's GPU compiler (with
the ptxas bundled in the triton wheel) lowers them to cubins, each as an aligned launch and as an
unaligned one specialises it (see `compile_one`), for the launch configurations the launchers use:
every autotune candidate of the attention kernels at head dim 128 with all switches on, the other
head dims with one candidate, and the loss kernels at the block sizes `_forward` and `_backward`
pick. It also reads each cubin's registers and local-memory stack (`resource_usage`) and checks that
the attention kernels' dots lower to Hopper's warpgroup tensor-core instructions (`tensor_core_ops`):
a kernel that falls back to the older mma.sync form cannot approach the H100/H200 targets. Run with
TRITON_INTERPRET unset (the test runs it in a subprocess).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sass  # noqa: E402  (tests/, this script's folder)
from unigendet.kernels import attention, loss  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # opt-in shared memory per block on H100/H200
FP32_POINTERS = {"LSE", "LSE2", "DELTA", "DELTA2", "DLSE"}  # attention: fp32 softmax statistics
FLOAT_SCALARS = {"qk_scale", "sm_scale", "grad_mul", "eps", "inv_m", "w_align", "wsum_eps", "coef_total",
                 "coef_align", "coef_all"}
STUDENT_POINTERS = {"s_ptr", "t_ptr", "gs_ptr", "g_ptr"}  # loss: rows in the activations' dtype


def signature(fn, constexprs: dict, dtype: str) -> dict[str, str]:
    """Triton types of `fn`'s arguments: data pointers in `dtype`, statistics in fp32, lengths i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name.startswith("LEN_"):
            sig[name] = "*i32"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in STUDENT_POINTERS else "*fp32"
        elif name.isupper() and name not in ("T", "H", "GROUP", "M", "C", "N") and not name.startswith("T_"):
            sig[name] = f"*{dtype}"  # attention tensors: Q, K, V, O, DO, DQ, DK, DV, ...
        else:
            sig[name] = "i32"  # sizes and strides
    return sig


ALIGNED_INTS = re.compile(r"s[a-z0-9]*[bth]|stride_[a-z]|C|N|n_s")  # strides; the loss's row width and sizes


def compile_one(fn, constexprs: dict, num_warps: int, num_stages: int = 3, dtype: str = "bf16",
                aligned: bool = False):
    """A cubin of `fn`. aligned: as a launch on the usual tensors specialises it (16-byte aligned
    pointers; strides, row width and element counts multiples of 16: Triton vectorises and drops
    address arithmetic); else as a launch where none of that holds (an odd head dim or row width, a
    misaligned view)."""
    sig = signature(fn, constexprs, dtype)
    hinted = [n for n, ty in sig.items() if ty.startswith("*") or (ty == "i32" and ALIGNED_INTS.fullmatch(n))]
    source = ASTSource(fn=fn, signature=sig,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted} if aligned else {})
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(cubin: bytes) -> tuple[int, int] | None:
    """(registers per thread, bytes of local-memory stack) of a cubin, read with the cuobjdump in the
    triton wheel (None where it is missing). A stack means ptxas spilled registers: an error in the
    memory-bound loss kernels, a diagnostic in attention (autotuning may still find one fastest)."""
    cuobjdump = sass.cuobjdump()
    if cuobjdump is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        listing = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", listing)
    return (int(found.group(1)), int(found.group(2))) if found else None


def tensor_core_ops(ptx: str) -> tuple[int, int]:
    """(Hopper warpgroup MMAs `wgmma.mma_async`, Ampere-style warp MMAs `mma.sync`) in a kernel's PTX."""
    return ptx.count("wgmma.mma_async"), len(re.findall(r"\bmma\.sync\b", ptx))


def scalar_16bit_accesses(ptx: str) -> int:
    """Global loads and stores of single 16-bit elements (`ld.global.b16`; not `.v4.b16`) in PTX. An
    aligned launch moves the activations in 16-byte vectors; scalar ones mean Triton could not prove
    the contiguity or alignment it needs, and the kernel runs far from the memory bandwidth."""
    return len(re.findall(r"\b(?:ld|st)\.global(?:\.(?!v\d)[a-z0-9]+)*\.b16\b", ptx))


def variants():
    """(label, kernel, constexprs, num_warps, num_stages, dtype) for everything this script compiles:
    bf16 throughout, and fp16 for each attention kernel's first candidate and one loss shape."""
    def attn_meta(d):
        return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=False, PREC="tf32")

    tuned = ((attention._mmsa_fwd, attention._FWD_CONFIGS, "READ_OTHER"),
             (attention._mmsa_bwd_dq, attention._DQ_CONFIGS, "READ_OTHER"),
             (attention._mmsa_bwd_dkdv, attention._DKDV_CONFIGS, "OTHER_READS"))
    for fn, configs, other in tuned:
        for k, cfg in enumerate(configs):
            for d in (128,) if k else (32, 64, 96, 128):
                meta = {**attn_meta(d), **cfg.kwargs, "CAUSAL": True, other: True}
                for dtype in ("bf16", "fp16") if k == 0 and d == 128 else ("bf16",):
                    label = f"{fn.__name__} D={d} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages} {dtype}"
                    yield label, fn, meta, cfg.num_warps, cfg.num_stages, dtype
    yield ("_bwd_preprocess D=128", attention._bwd_preprocess,
           {"HAS_DLSE": True, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64}, 4, 3, "bf16")
    for M, C in ((4096, 96), (1037, 500), (16384, 1024), (64, 8192), (8, 20000)):  # row tiles, wide, chunked
        block_m, block_c, one_pass, warps = loss._align_config(M, C)
        meta = dict(BLOCK_M=block_m, BLOCK_C=block_c, ONE_PASS=one_pass, BCE_BLOCK=loss.BCE_BLOCK,
                    GRAD_S=True, GRAD_Z=True)
        for dtype in ("bf16", "fp16") if C == 1024 else ("bf16",):
            yield f"_fwd_kernel (loss) M={M} C={C} {dtype}", loss._fwd_kernel, meta, warps, 3, dtype
    yield ("_finalize_kernel (loss)", loss._finalize_kernel,
           {"HAS_ALIGN": True, "HAS_BCE": True, "BLOCK": loss.FIN_BLOCK}, 8, 3, "bf16")
    yield ("_bwd_kernel (loss)", loss._bwd_kernel, {"HAS_S": True, "HAS_Z": True, "BLOCK": loss.SCALE_BLOCK}, 8, 3,
           "bf16")


def check_one(label, fn, meta, warps, stages, dtype: str, aligned: bool) -> tuple[str, bool]:
    """Compile one variant; (its report line, whether it spills). Raises what must fail the run:
    too much shared memory anywhere, a register spill in the memory-bound loss kernels, an attention
    kernel whose matrix products are not (all) warpgroup MMAs or (aligned) not pipelined through
    cp.async, scalar 16-bit accesses in an aligned launch."""
    kernel = compile_one(fn, meta, warps, stages, dtype=dtype, aligned=aligned)
    shared = kernel.metadata.shared
    if shared > SHARED_LIMIT:
        raise RuntimeError(f"needs {shared} B of shared memory per block; sm_90 has {SHARED_LIMIT}")
    scalar16 = scalar_16bit_accesses(kernel.asm["ptx"]) if aligned else 0
    if scalar16:
        raise RuntimeError(f"{scalar16} scalar 2-byte global loads/stores in an aligned launch; want vector accesses")
    wgmma, mma_sync = tensor_core_ops(kernel.asm["ptx"])
    is_attention = fn in (attention._mmsa_fwd, attention._mmsa_bwd_dq, attention._mmsa_bwd_dkdv)
    if is_attention and (mma_sync or not wgmma):
        raise RuntimeError(f"dots lower to {wgmma} wgmma.mma_async and {mma_sync} mma.sync; want wgmma only")
    if is_attention and aligned and "cp.async" not in kernel.asm["ptx"]:
        raise RuntimeError("no cp.async: the key/value blocks are not software-pipelined")
    usage = resource_usage(kernel.asm["cubin"])
    spills = bool(usage and usage[1] > 0)
    if spills and "(loss)" in label:
        raise RuntimeError(f"spills registers ({usage[0]} registers, {usage[1]} B stack) in a memory-bound kernel")
    regs = f"{usage[0]} registers, {usage[1]} B stack" if usage else "registers unread"
    mma = f", {wgmma} wgmma" if wgmma else ""
    return f"{len(kernel.asm['cubin'])} B cubin, {shared} B shared memory, {regs}{mma}", spills


def main() -> int:
    failures = total = 0
    spilling = {True: [], False: []}
    for label, fn, meta, warps, stages, dtype in variants():
        for aligned in (True, False):
            t0, total = time.perf_counter(), total + 1
            name = f"{label} [{'aligned' if aligned else 'unaligned'}]"
            try:
                report, spills = check_one(label, fn, meta, warps, stages, dtype, aligned)
                if spills:
                    spilling[aligned].append(label)
                print(f"ok    {name}: {report}, {time.perf_counter() - t0:.1f} s", flush=True)
            except Exception as exc:  # report every variant, then fail
                failures += 1
                print(f"FAIL  {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      flush=True)
    for aligned, labels in spilling.items():
        print(f"attention variants that spill registers when {'aligned' if aligned else 'unaligned'}: "
              f"{len(labels)}: " + ("; ".join(labels) or "none"))
    print(f"compiled {total - failures} of {total} kernel variants for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
