"""The generator's inputs in latent space (model.vae): each step's normalised VAE latents of its batch.

A batch read from shards packed with latents carries the posterior's moments (`Batch.latent_moments`);
otherwise the step encodes its pixels on the fly. Either way the latents are sampled with
`FrozenVAE.sample_latents` and a generator seeded from (train.seed, step, rank), so packed and
on-the-fly batches give the same latents for the same moments, and a resumed run draws what the
uninterrupted run drew (the seed depends on nothing but the step).
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
    """Writes each step's latents (B, K, s, s) into one device buffer (static for CUDA graphs)."""

    def __init__(self, vae: FrozenVAE, seed: int, rank: int):
        self.vae, self.seed, self.rank = vae, seed, rank
        self.buffer: Tensor | None = None

    def moments(self, batch: Batch, images: Tensor) -> Tensor:
        """(B, 2K, s, s) fp32 on the images' device: the batch's packed moments, else encoded now."""
        if batch.latent_moments is not None:
            return batch.latent_moments.to(images.device, torch.float32, non_blocking=True)
        return self.vae.encode_moments(images)

    def load(self, batch: Batch, images: Tensor, step: int) -> Tensor:
        """The latents of `batch` at `step` (images: the batch's pixels on the device), in `buffer`."""
        latents = self.vae.sample_latents(self.moments(batch, images), latent_noise(self.seed, step, self.rank))
        if self.buffer is None or self.buffer.shape != latents.shape:
            self.buffer = torch.empty_like(latents)
        self.buffer.copy_(latents)
        return self.buffer
