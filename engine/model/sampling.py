"""Euler sampling of the rectified flow: integrate dx/dt = v_hat from t = 1 (noise) to t = 0."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_grid(steps: int, shift: float = 1.0) -> list[float]:
    """The sampler's steps + 1 times, from 1 (noise) down to 0 (image).

    The uniform grid t_i = 1 - i / steps, mapped through the timestep shift of SD3 / FLUX:
    t' = shift * t / (1 + (shift - 1) * t). shift > 1 spends more of the steps at high noise,
    shift < 1 at low noise; shift = 1 is the uniform grid itself (the same floats, bit for bit).
    """
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"timestep shift must be a finite number > 0, got {shift!r}")
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps!r}")
    grid = [1.0 - i / steps for i in range(steps + 1)]
    if shift == 1.0:
        return grid
    shifted = [shift * t / (1.0 + (shift - 1.0) * t) for t in grid]
    shifted[0], shifted[-1] = 1.0, 0.0  # exact ends (1 + (shift - 1) can round away from shift)
    return shifted


@torch.no_grad()
def euler_sample(model, n: int, *, steps: int = 8, seed: int | None = None, generator: torch.Generator | None = None,
                 class_ids: Tensor | None = None, cfg_scale: float = 1.0, batch_size: int | None = None,
                 device=None, dtype=torch.float32, shift: float = 1.0) -> Tensor:
    """-> (n, 3, S, S) images in [-1, 1] from `model` (a UniGenDet).

    A latent model (model.vae) integrates in its latent space and decodes each chunk with its
    attached VAE, so callers get images either way.

    Noise comes from `generator` or a fresh one seeded with `seed`. With class_ids (n,) and
    cfg_scale != 1, classifier-free guidance mixes conditional and unconditional velocities.
    shift: timestep shift of the grid (`timestep_grid`); 1 = uniform steps.
    """
    ts = timestep_grid(steps, shift)
    device = device or next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    shape = model.x_shape  # (K, s, s): the image, or the VAE latent
    batch_size = batch_size or n
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        x = torch.randn(m, *shape, generator=generator, device=device, dtype=torch.float32)
        ids = None if class_ids is None else class_ids[start:start + m].to(device)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            tt = torch.full((m,), t, device=device)
            v = model("gen", x.to(dtype), tt, ids).velocity.float()
            if ids is not None and cfg_scale != 1.0:
                v_u = model("gen", x.to(dtype), tt, torch.full_like(ids, -1)).velocity.float()
                v = v_u + cfg_scale * (v - v_u)
            x = x + (t_next - t) * v
        chunks.append(model.to_pixels(x).float().clamp(-1, 1))
    return torch.cat(chunks)
