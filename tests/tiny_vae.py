"""A tiny random-initialised diffusers AutoencoderKL for the latent-path tests.

Saved with `save_pretrained` into a folder, so tests load it through `load_vae`, the path a user's VAE
takes. Two blocks: latents are 4 channels on a grid 2x smaller than the image.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_VAE_CHANNELS = 4
TINY_VAE_DOWNSAMPLE = 2


def make_tiny_vae(folder: str | Path, seed: int = 0, shift_factor: float | None = 0.1,
                  scaling_factor: float = 0.5) -> Path:
    """Build and save the tiny VAE into `folder` (created); return the folder. shift_factor None = an
    SD-style VAE without one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=TINY_VAE_CHANNELS,
        norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
        mid_block_add_attention=False,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder)
    return folder
