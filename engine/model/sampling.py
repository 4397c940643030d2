"""Euler sampling of the rectified flow: integrate dx/dt = v_hat from t = 1 (noise) to t = 0."""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def euler_sample(model, n: int, *, steps: int = 8, seed: int | None = None, generator: torch.Generator | None = None,
                 class_ids: Tensor | None = None, cfg_scale: float = 1.0, batch_size: int | None = None,
                 device=None, dtype=torch.float32) -> Tensor:
    """-> (n, 3, S, S) images in [-1, 1] from `model` (a UniGenDet).

    Noise comes from `generator` or a fresh one seeded with `seed`. With class_ids (n,) and
    cfg_scale != 1, classifier-free guidance mixes conditional and unconditional velocities.
    """
    device = device or next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    S = model.cfg.image_size
    batch_size = batch_size or n
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        x = torch.randn(m, 3, S, S, generator=generator, device=device, dtype=torch.float32)
        ids = None if class_ids is None else class_ids[start:start + m].to(device)
        for i in range(steps):
            t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
            tt = torch.full((m,), t, device=device)
            v = model("gen", x.to(dtype), tt, ids).velocity.float()
            if ids is not None and cfg_scale != 1.0:
                v_u = model("gen", x.to(dtype), tt, torch.full_like(ids, -1)).velocity.float()
                v = v_u + cfg_scale * (v - v_u)
            x = x + (t_next - t) * v
        chunks.append(x.clamp(-1, 1))
    return torch.cat(chunks)
