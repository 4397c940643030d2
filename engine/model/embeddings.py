"""Token embeddings of the two streams: patchify, timestep, class, position, registers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, K, S, S) -> (B, N, K*p*p) with N = (S/p)^2, tokens in row-major grid order (K = 3 for pixels,
    the VAE's latent channels for latents)."""
    B, C, S, _ = x.shape
    g = S // p
    x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
    return x.reshape(B, g * g, C * p * p)


def unpatchify(tokens: Tensor, p: int, channels: int = 3) -> Tensor:
    """(B, N, K*p*p) -> (B, K, S, S) with K = channels; inverse of `patchify`."""
    B, N, _ = tokens.shape
    g = math.isqrt(N)
    x = tokens.reshape(B, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
    return x.reshape(B, channels, g * p, g * p)


def resize_token_grid(tokens: Tensor, grid: int) -> Tensor:
    """(B, g*g, C) tokens of a square grid -> (B, grid*grid, C), resized bilinearly (align_corners=False,
    as REPA-style alignment does when the teacher's grid is not the student's)."""
    B, N, C = tokens.shape
    g = math.isqrt(N)
    if g == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(B, C, g, g)  # (B, C, g, g)
    x = F.interpolate(x.float(), size=(grid, grid), mode="bilinear", align_corners=False).to(tokens.dtype)
    return x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)


def sincos_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(...,) float -> (..., dim) sinusoidal features (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) fixed 2-D position embedding: half the channels encode the row, half the column."""
    pos = torch.arange(grid * grid)
    rows, cols = sincos_embedding(pos // grid, dim // 2, 100.0), sincos_embedding(pos % grid, dim // 2, 100.0)
    return torch.cat([rows, cols], -1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, C): sinusoid of 1000 t, then a 2-layer MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        features = sincos_embedding(t * 1000.0, self.freq_dim)  # fp32; the MLP's dtype for a bf16 model
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class GenStreamEmbed(nn.Module):
    """G stream: patchify(x_t) -> Linear(Kp^2, C) + timestep_embed(t) + class_embed(y) + pos_embed.

    x_t is an image (K = 3, side = the image size) or a VAE latent (K = latent channels, side = the
    latent grid)."""

    def __init__(self, image_size: int, patch: int, width: int, num_classes: int, channels: int = 3):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, width)
        self.time = TimestepEmbedder(width)
        # index num_classes is the "no class" token used for unconditional / dropped labels
        self.classes = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.null_class = num_classes
        self.register_buffer("pos", sincos_pos_embed_2d(image_size // patch, width), persistent=False)

    def forward(self, x_t: Tensor, t: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """x_t: (B, K, S, S), t: (B,), class_ids: (B,) with -1 = none -> (B, N, C)."""
        h = self.proj(patchify(x_t, self.patch))
        h = h + self.pos.to(h.dtype)  # h's dtype, not x_t's: under autocast the stream is bf16 from here on
        cond = self.time(t)  # (B, C)
        if self.classes is not None:
            ids = torch.full_like(t, self.null_class, dtype=torch.long) if class_ids is None else class_ids
            cond = cond + self.classes(torch.where(ids < 0, torch.full_like(ids, self.null_class), ids))
        return h + cond[:, None, :].to(h.dtype)


class DetStreamEmbed(nn.Module):
    """D stream: N patch tokens + pos_embed, then R learned register tokens (the first is CLS).

    The registers follow the image tokens so that under a causal detector stream (`d_causal`) the
    CLS token, at index N, still reads every image token. Registers carry no position (identity
    rotation in RoPE), so without the causal rule their place in the sequence changes nothing."""

    def __init__(self, image_size: int, patch: int, width: int, registers: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3 * patch * patch, width)
        self.registers = nn.Parameter(torch.randn(registers, width) * 0.02)
        self.register_buffer("pos", sincos_pos_embed_2d(image_size // patch, width), persistent=False)

    def forward(self, x: Tensor, constant: bool = False) -> Tensor:
        """x: (B, 3, S, S) -> (B, N + R, C): image tokens, then registers. constant: use the weights
        as constants (the gradient still reaches x)."""
        get = (lambda t: t.detach()) if constant else (lambda t: t)  # noqa: E731
        h = F.linear(patchify(x, self.patch), get(self.proj.weight), get(self.proj.bias))
        h = h + self.pos.to(h.dtype)  # as in GenStreamEmbed: an fp32 pos must not promote a bf16 stream
        reg = get(self.registers).to(h.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([h, reg], dim=1)
