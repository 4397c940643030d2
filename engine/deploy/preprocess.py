"""The detector's input transform as tensor ops: uint8 RGB images of any size -> (B, 3, S, S) in [-1, 1].

`unigendet detect`, evaluation and the data loaders resize with Pillow: shorter side to S, center
crop, one antialiased bicubic resample of the crop box (`Image.resize(..., BICUBIC, box=...)`).
`center_crop_resize` computes the same pixels with standard tensor ops, so that an exported graph
(ONNX, torch.export) can take raw images: Pillow's algorithm, step by step:

- separable resampling: a coefficient matrix per axis, the bicubic kernel (a = -0.5) stretched by the
  downscale factor (the antialiasing), each output row of coefficients normalised to sum 1;
- 8-bit images use fixed-point arithmetic: coefficients rounded to integers of 22 fractional bits,
  each pass adds half a unit, shifts right and clips to 0..255, so the first pass is rounded to
  8 bits before the second reads it;
- pass order: Pillow runs the horizontal pass first, except (Pillow >= 13) when the image height
  shrinks more than twice as much as its width, (H - S) > 2 (W - S), then the vertical pass first.
  The two orders differ by the intermediate rounding only; `vertical_first_when_tall` chooses.

The integer sums are exact in float64 (|sum| < 2**31), so the result is the same bit for bit wherever
it runs. Cost: dense coefficient matrices, O(B H W S) multiply-adds for the first pass (Pillow
touches only the ~4 W / S taps per output pixel): fine for the model's S = 32..64.
"""
from __future__ import annotations

import torch
from PIL import __version__ as PILLOW_VERSION
from torch import Tensor

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2 bits
BICUBIC_SUPPORT = 2.0


def pillow_runs_tall_images_vertically_first(version: str = PILLOW_VERSION) -> bool:
    """Whether this Pillow version resamples tall images vertical pass first (Pillow 13 and newer)."""
    return int(version.split(".")[0]) >= 13


def bicubic_kernel(x: Tensor) -> Tensor:
    """Pillow's bicubic filter (Keys, a = -0.5), zero outside |x| < 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_coefficients(in_size, in0, side, out_size: int) -> Tensor:
    """(out_size, in_size) float64 fixed-point coefficients resampling [in0, in0 + side) to out_size.

    in_size, side: ints (or symbolic ints while exporting); in0: the box start, a multiple of 0.5.
    Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`, on every input index: the bicubic kernel
    is zero outside Pillow's tap window, so the dense matrix holds exactly Pillow's taps."""
    scale = side / out_size
    stretch = torch.clamp(torch.full((), scale, dtype=torch.float64), min=1.0)  # antialiasing when shrinking
    center = in0 + (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # (out,)
    taps = torch.arange(in_size, dtype=torch.float64)  # (in,)
    weights = bicubic_kernel((taps[None, :] - center[:, None] + 0.5) * (1.0 / stretch))  # (out, in)
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total != 0, weights / torch.where(total != 0, total, 1.0), weights)
    fixed = weights * float(1 << PRECISION_BITS)
    return torch.where(fixed < 0, torch.ceil(fixed - 0.5), torch.floor(fixed + 0.5))  # C's (int)(k +- 0.5)


def _to_8bit(acc: Tensor) -> Tensor:
    """A pass's fixed-point sums -> 0..255 (float64): + half a unit, arithmetic shift, clip."""
    return torch.floor((acc + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).clamp(0.0, 255.0)


def _horizontal_first(planes: Tensor, cols: Tensor, rows: Tensor) -> Tensor:
    """planes (B, 3, H, W) -> (B, 3, S, S): the rows resampled first, then the columns."""
    wide = _to_8bit(torch.matmul(planes, cols.t()))  # (B, 3, H, S)
    return _to_8bit(torch.matmul(rows, wide)).contiguous()  # (B, 3, S, S)


def _vertical_first(planes: Tensor, cols: Tensor, rows: Tensor) -> Tensor:
    """planes (B, 3, H, W) -> (B, 3, S, S): the columns resampled first (Pillow 13, tall images)."""
    tall = _to_8bit(torch.matmul(rows, planes))  # (B, 3, S, W)
    return _to_8bit(torch.matmul(tall, cols.t())).contiguous()  # (B, 3, S, S)


def center_crop_resize(images: Tensor, size: int, *, vertical_first_when_tall: bool | None = None) -> Tensor:
    """uint8 images (B, H, W, 3) -> (B, 3, size, size) float32 in [-1, 1] (0 -> -1, 255 -> +1).

    The centered square of side min(H, W), resampled to size x size as Pillow's antialiased bicubic
    does (module docstring). vertical_first_when_tall: Pillow 13's pass order for tall images (None =
    that of the installed Pillow)."""
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"center_crop_resize: expected uint8 images (B, H, W, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if vertical_first_when_tall is None:
        vertical_first_when_tall = pillow_runs_tall_images_vertically_first()
    height, width = images.shape[1], images.shape[2]
    side = torch.sym_min(height, width)
    cols = resample_coefficients(width, (width - side) / 2, side, size)  # (S, W)
    rows = resample_coefficients(height, (height - side) / 2, side, size)  # (S, H)
    planes = images.permute(0, 3, 1, 2).to(torch.float64)  # (B, 3, H, W): each pass one matrix product
    if vertical_first_when_tall:
        tall = (height - size > 0) & (height - size > 2 * (width - size))  # Pillow 13's ImagingResampleInner
        out = torch.cond(tall, _vertical_first, _horizontal_first, (planes, cols, rows))
    else:
        out = _horizontal_first(planes, cols, rows)
    return out.float().div(127.5).sub(1.0)  # (B, 3, S, S)
