"""Output heads: the generator's velocity and the detector's authenticity logit."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .embeddings import unpatchify


class GeneratorHead(nn.Module):
    """Final norm -> Linear(C, Kp^2) -> unpatchify: the predicted velocity v_hat (B, K, S, S) (K = 3 for
    pixels, the VAE's latent channels for latents)."""

    def __init__(self, width: int, patch: int, eps: float, channels: int = 3):
        super().__init__()
        self.patch, self.eps, self.channels = patch, eps, channels
        self.norm = nn.Parameter(torch.ones(width))
        self.proj = nn.Linear(width, channels * patch * patch)
        nn.init.zeros_(self.proj.weight)  # v_hat = 0 at init: training starts from a neutral field
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, res: Tensor | None) -> Tensor:
        h, _ = ops.fused_add_rmsnorm(x, res, self.norm, self.eps)  # (B, N, C)
        return unpatchify(self.proj(h), self.patch, self.channels)


class DetectorHead(nn.Module):
    """CLS token -> norm -> MLP -> one logit per image (label 1 = generated, p_fake = sigmoid).

    The CLS token is the first register, at index `cls_index` = N of the detector stream."""

    def __init__(self, width: int, eps: float, cls_index: int):
        super().__init__()
        self.eps, self.cls_index = eps, cls_index
        self.norm = nn.Parameter(torch.ones(width))
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def normed(self, x: Tensor, res: Tensor | None) -> Tensor:
        """The detector stream's final-normed hidden states (B, T, C) (also the DIGA teacher)."""
        return ops.fused_add_rmsnorm(x, res, self.norm, self.eps)[0]

    def forward(self, x: Tensor, res: Tensor | None) -> Tensor:
        cls = slice(self.cls_index, self.cls_index + 1)
        return self.mlp(self.normed(x[:, cls], None if res is None else res[:, cls]))[:, 0, 0]  # (B,)
