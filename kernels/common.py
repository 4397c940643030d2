"""What the attention-like Triton kernels (attention.py, consistency.py) share: the constants and tile
helpers their kernels call, and the host side's launch plumbing (tile configs, the launcher that picks
interpreter tiles, a fixed config or the autotuned kernel, stride and length arguments)."""
import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # host side: scale * LOG2E puts the scores in base-2 units
# *_C: the same as constexprs, the only kind of global a kernel may read (the interpreter does not check
# this; the compiler does)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)
NEG_BIG_C = tl.constexpr(-1.0e30)  # initial running max: finite, so fully masked rows give p = 0, never NaN

# UNIGENDET_TRITON_AUTOTUNE=0: launch each kernel with its smallest candidate instead of timing them
# all per shape (quick correctness runs on a GPU, e.g. most op tests in bench/gpu_check.sh).
AUTOTUNE = os.environ.get("UNIGENDET_TRITON_AUTOTUNE", "1") != "0"


@triton.jit
def dmask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head-dim lanes in use: a constant all-true mask (folded away) unless D was padded (96 -> 128)."""
    if HEAD_DIM == BLOCK_D:
        ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        ok = offs_d < HEAD_DIM
    return ok


@triton.jit
def cast_out(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> output dtype, round to nearest even. The interpreter truncates fp32 -> bf16, so
    there the rounding is done on the bits (on GPU the plain cast is already RTNE)."""
    if UPCAST and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


def configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune candidates from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


class KernelLauncher:
    """Launches a module's kernels by name: the interpreter's tile sizes under TRITON_INTERPRET, the
    fixed (smallest) candidate for fp32 or with autotuning off, else the autotuned kernel.

    interpret_blocks: {name: (BLOCK_M, BLOCK_N)}; fixed: {name: triton.Config}."""

    def __init__(self, interpret: bool, interpret_blocks: dict, fixed: dict):
        self.interpret, self.interpret_blocks, self.fixed = interpret, interpret_blocks, fixed

    def __call__(self, tuned, plain, which: str, grid, *args, **meta) -> None:
        if self.interpret:
            bm, bn = self.interpret_blocks[which]
            plain[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
        elif not AUTOTUNE or meta["PREC"] == "ieee":  # fp32: IEEE dots compile 5-30 s a config, too slow to tune
            c = self.fixed[which]
            plain[grid](*args, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, **meta)
        else:
            tuned[grid](*args, **meta)


def head_meta(q: Tensor, interpret: bool) -> dict:
    """The compile-time meta-parameters every attention-like kernel takes from its (..., D) queries."""
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), UPCAST=interpret,
                PREC="ieee" if q.dtype == torch.float32 else "tf32")  # 16-bit dots ignore PREC


def strides3(x: Tensor) -> tuple[int, int, int]:
    """The (B, T, H) strides of a (B, T, H, D) tensor, as kernels take them."""
    return x.stride(0), x.stride(1), x.stride(2)


def unit_last(x: Tensor) -> Tensor:
    """Kernels take any (B, T, H) strides but need a unit stride over D for vector loads."""
    return x if x.stride(-1) == 1 else x.contiguous()


def device_guard(x: Tensor):
    """Launches go to x's GPU (a no-op context on CPU, i.e. under the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def valid_lengths(lens: Tensor | None, B: int, T: int, device) -> Tensor:
    """(B,) int32 valid lengths on `device`: `lens`, or T for every row when None."""
    if lens is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    return lens.to(device=device, dtype=torch.int32)
