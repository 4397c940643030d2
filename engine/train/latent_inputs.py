"""The generator's inputs in latent space (model.vae): each step's normalised VAE latents of its batch.

A batch read from shards packed with latents carries the posterior's moments (`Batch.latent_moments`);
otherwise the step encodes its pixels on the fly. Either way the latents are sampled with
`FrozenVAE.sample_latents` and a generator seeded from (train.seed, step, rank), so packed and
on-the-fly batches give the same latents for the same moments, and a resumed run draws what the
uninterrupted run drew (the seed depends on nothing but the step). With model.d2g the detection
passes of the batch's images read its posterior means (`FrozenVAE.mean_latents`) instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..data import Batch
from ..vae import FrozenVAE

LATENT_NOISE_STREAM = 0x1A7E_0000  # keeps this stream apart from the seeds of other per-step draws


def latent_noise(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one step's latent sampling noise (on the CPU so that every device draws
    the same numbers)."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + step * 1_009 + rank + LATENT_NOISE_STREAM) % (2**63))
    return gen


class LatentInputs:
    """Writes each step's latents (B, K, s, s) into device buffers (static for CUDA graphs): `buffer`,
    the sampled latents (the generator's x0), and `means`, the posterior means (detection passes)."""

    def __init__(self, vae: FrozenVAE, seed: int, rank: int):
        self.vae, self.seed, self.rank = vae, seed, rank
        self.buffer: Tensor | None = None
        self.means: Tensor | None = None

    def moments(self, batch: Batch, images: Tensor) -> Tensor:
        """(B, 2K, s, s) fp32 on the images' device: the batch's packed moments, else encoded now."""
        if batch.latent_moments is not None:
            return batch.latent_moments.to(images.device, torch.float32, non_blocking=True)
        return self.vae.encode_moments(images)

    def load(self, batch: Batch, images: Tensor, step: int, samples: bool = True, means: bool = False) -> None:
        """Write the latents of `batch` at `step` (images: the batch's pixels on the device): the sampled
        ones into `buffer` if `samples`, the posterior means into `means` if `means` (one encode at most)."""
        if not (samples or means):
            return
        moments = self.moments(batch, images)
        if samples:
            noise = latent_noise(self.seed, step, self.rank)
            self.buffer = _write(self.buffer, self.vae.sample_latents(moments, noise))
        if means:
            self.means = _write(self.means, self.vae.mean_latents(moments))


def _write(buffer: Tensor | None, value: Tensor) -> Tensor:
    """`value` copied into `buffer` (the same storage from step to step), allocated on first use."""
    if buffer is None or buffer.shape != value.shape:
        buffer = torch.empty_like(value)
    buffer.copy_(value)
    return buffer
