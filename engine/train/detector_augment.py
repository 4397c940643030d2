"""Augmentations of the detector's inputs, applied alike to real images and generated ones.

A detector trained on camera JPEGs against clean generator output can learn the difference in
processing (JPEG blocks, resampling, colour statistics) instead of what makes an image generated,
and then calls a photograph from another source fake. These augmentations (config section
`[augment]`, all off by default) run on the det phase's combined batch - real images, external
fakes and fake-pool images together, inside `phase_loss` - with per-row random parameters drawn
without looking at labels, so no class-specific trace survives. The loaders (PIL and DALI) are
untouched, so they stay identical.

Order per row, each with its own probability: random resized crop (zoom) -> colour jitter ->
Gaussian blur -> JPEG round trip. Everything runs on the images' device in float32 with fixed
shapes and no host reads, so it is CUDA-graph and torch.compile safe. The random numbers come from
the trainer's noise generator (`rng.batch_rand`: per-rank rows of a global-batch draw), whose state
every checkpoint saves, so a resumed run draws exactly what an uninterrupted one would. With every
probability 0 no augmentation object exists and nothing is drawn: training is bit-identical to a
config without the section.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AugmentConfig
from ..rng import Gen, batch_rand

# libjpeg's base quantisation tables (ITU T.81 Annex K), luma and chroma, row-major 8 x 8
_LUMA_Q = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_Q = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
             47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))
# uniform draws per row: apply x4 (crop, jitter, blur, jpeg), crop area, crop x, crop y, jitter x3,
# blur sigma, jpeg quality; always all of them, so the stream consumed does not depend on the settings
_DRAWS = 12


def augment_enabled(cfg: AugmentConfig) -> bool:
    return any(p > 0 for p in (cfg.crop_p, cfg.jitter_p, cfg.blur_p, cfg.jpeg_p))


def build_detector_augment(cfg: AugmentConfig) -> DetectorAugment | None:
    """The augmentation the trainer hands to `phase_loss`, or None when every probability is 0."""
    return DetectorAugment(cfg) if augment_enabled(cfg) else None


@functools.cache
def _jpeg_constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(DCT matrix D (8, 8), luma and chroma base tables (1, 8, 8)) on `device`, made once: the
    first (eager) steps create them, so a captured CUDA graph copies nothing from the host."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)  # orthonormal DCT-II
    d[0] /= math.sqrt(2)
    tables = [torch.tensor(t, dtype=torch.float32).view(1, 8, 8).to(device) for t in (_LUMA_Q, _CHROMA_Q)]
    return d.float().to(device), *tables


def _quant_tables(quality: Tensor, base: Tensor) -> Tensor:
    """libjpeg's quality scaling: quality (N,) in [1, 100], base (1, 8, 8) -> tables (N, 8, 8)."""
    q = quality.float()
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)  # (N,)
    return torch.floor((base * scale.view(-1, 1, 1) + 50) / 100).clamp(1, 255)


def _blockwise(planes: Tensor, tables: Tensor, dct: Tensor) -> Tensor:
    """Quantise planes (N, H, W) (H, W multiples of 8, level-shifted) in the DCT domain, per 8 x 8 block."""
    N, H, W = planes.shape
    blocks = planes.view(N, H // 8, 8, W // 8, 8).transpose(2, 3)  # (N, H/8, W/8, 8, 8)
    coef = dct @ blocks @ dct.T
    t = tables.view(N, 1, 1, 8, 8)
    coef = torch.round(coef / t) * t
    return (dct.T @ coef @ dct).transpose(2, 3).reshape(N, H, W)


def jpeg_round_trip(x: Tensor, quality: Tensor) -> Tensor:
    """Baseline JPEG encode + decode of x (N, 3, S, S) in [-1, 1] at per-row quality (N,) in [1, 100].

    The lossy steps of a JPEG encoder (8-bit pixels, JFIF YCbCr, 4:2:0 chroma subsampling by 2 x 2
    averaging, 8 x 8 DCT quantised with libjpeg's quality-scaled tables) and of a decoder (chroma
    upsampled by pixel replication, 8-bit RGB); the entropy coding between them is lossless and left
    out. Computed in torch so it runs on the device, inside a CUDA graph."""
    N, _, H, W = x.shape
    ph, pw = (-H) % 16, (-W) % 16  # whole chroma blocks: pad to a multiple of 16, cut after
    rgb = torch.round((x + 1) * 127.5).clamp(0, 255)
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    r, g, b = rgb.unbind(1)  # (N, H', W') each
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # (N, 2, H'/2, W'/2)
    dct, luma, chroma_base = _jpeg_constants(x.device)
    y = _blockwise(y - 128, _quant_tables(quality, luma), dct) + 128
    c_tab = _quant_tables(quality, chroma_base).repeat_interleave(2, 0)  # (2N, 8, 8): Cb, Cr per row
    chroma = _blockwise(chroma.flatten(0, 1) - 128, c_tab, dct).view_as(chroma) + 128
    cb, cr = chroma.repeat_interleave(2, 2).repeat_interleave(2, 3).unbind(1)
    out = torch.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                       y + 1.772 * (cb - 128)], 1)
    out = torch.round(out).clamp(0, 255)[:, :, :H, :W]
    return out / 127.5 - 1


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur of x (N, C, H, W) in [-1, 1] with per-row sigma (N,) (pixels), reflect-padded."""
    N, C, H, W = x.shape
    radius = max(1, min(radius, H - 1, W - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-offsets.square() / (2 * sigma.view(-1, 1).square()))  # (N, K)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, K)
    flat = x.reshape(1, N * C, H, W)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k.view(N * C, 1, 1, -1), groups=N * C)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k.view(N * C, 1, -1, 1), groups=N * C)
    return flat.view(N, C, H, W).clamp(-1, 1)  # a convex combination, but rounding can step past +-1


def zoom_crop(x: Tensor, area: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    """Square crop of `area` (N,) of each image (fractions in (0, 1]) at relative offsets cx, cy (N,)
    in [0, 1], resized back to the full size (bilinear)."""
    side = area.sqrt()  # (N,) fraction of the side
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, 0, 2] = (1 - side) * (2 * cx - 1)
    theta[:, 1, 2] = (1 - side) * (2 * cy - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """Brightness, contrast, saturation factors (N,) around 1 applied to x (N, 3, S, S) in [-1, 1]."""
    y = (x + 1) / 2 * brightness.view(-1, 1, 1, 1)
    gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)  # (N, 1, S, S)
    mean = gray.mean((2, 3), keepdim=True)
    y = (y - mean) * contrast.view(-1, 1, 1, 1) + mean
    gray = gray.sub(mean).mul(contrast.view(-1, 1, 1, 1)).add(mean)
    y = (y - gray) * saturation.view(-1, 1, 1, 1) + gray
    return y.clamp(0, 1) * 2 - 1


class DetectorAugment:
    """images (N, 3, S, S) in [-1, 1] -> augmented images (same shape, float32); labels never read."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.blur_radius = math.ceil(3 * cfg.blur_sigma[1])
        self._probabilities: dict[torch.device, Tensor] = {}  # (4,) per device, made on the first call

    def probabilities(self, device: torch.device) -> Tensor:
        """(crop_p, jitter_p, blur_p, jpeg_p) on `device`, made once (no host copy inside a CUDA graph)."""
        if device not in self._probabilities:
            c = self.cfg
            self._probabilities[device] = torch.tensor([c.crop_p, c.jitter_p, c.blur_p, c.jpeg_p]).to(device)
        return self._probabilities[device]

    def __call__(self, images: Tensor, generator: Gen) -> Tensor:
        cfg = self.cfg
        N = images.shape[0]
        u = batch_rand((N, _DRAWS), generator, device=images.device)  # (N, 12)
        apply = u[:, :4] < self.probabilities(images.device)  # (N, 4)
        with torch.autocast(images.device.type, enabled=False):  # JPEG rounding needs float32
            x = images.float()
            if cfg.crop_p > 0:
                lo, hi = cfg.crop_scale
                x = _where(apply[:, 0], zoom_crop(x, lo + (hi - lo) * u[:, 4], u[:, 5], u[:, 6]), x)
            if cfg.jitter_p > 0:
                b, c, s = (1 + amount * (2 * u[:, 7 + i] - 1) for i, amount in
                           enumerate((cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation)))
                x = _where(apply[:, 1], colour_jitter(x, b, c, s), x)
            if cfg.blur_p > 0:  # sigma log-uniform in the range
                lo, hi = (math.log(v) for v in cfg.blur_sigma)
                x = _where(apply[:, 2], gaussian_blur(x, torch.exp(lo + (hi - lo) * u[:, 10]), self.blur_radius), x)
            if cfg.jpeg_p > 0:  # integer quality, uniform in the range
                lo, hi = cfg.jpeg_quality
                quality = torch.floor(lo + (hi - lo + 1) * u[:, 11]).clamp(lo, hi)
                x = _where(apply[:, 3], jpeg_round_trip(x, quality), x)
        return x.to(images.dtype)


def _where(rows: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Row-wise select: new where rows (N,) is true, else old, bit for bit."""
    return torch.where(rows.view(-1, 1, 1, 1), new, old)
