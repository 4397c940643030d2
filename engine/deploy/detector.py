"""The detector as a standalone module: raw uint8 images in, p_fake out, nothing of the generator it
does not read.

    wrapper = DetectorForExport(model)          # model: a loaded UniGenDet (the weights `detect` uses)
    p_fake = wrapper(images)                     # images: uint8 (B, H, W, 3), any H and W -> (B,) float32

What the graph keeps (`detector_only`): the detection pass reads the detector stream's weights (its
embedding, registers, detector experts, head) and the shared ones; with model.d2g it also reads the
generator stream's keys in the MMSA layers, so it keeps the generator-stream embedding of the clean
image and the generator experts up to the last layer whose keys the detector reads. Dropped: the
generator head, the DIGA projector, the timestep MLP and the class table (at t = 0 with no class
their output is one constant vector, computed once), and every generator expert after that layer.
A latent model with d2g reads the posterior means of the image's VAE latent in the generator stream:
its graph keeps the VAE's encoder (`LatentEncoder`), never the decoder.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..model import UniGenDet
from ..model.embeddings import GenStreamEmbed, patchify
from .preprocess import center_crop_resize, pillow_runs_tall_images_vertically_first


class CleanImageEmbed(nn.Module):
    """The generator-stream tokens of a clean image as the detection pass asks for them (t = 0, no
    class): patch projection + position + one constant conditioning vector. Same values as
    `GenStreamEmbed(x, zeros)`; the detection pass never calls it with another t."""

    def __init__(self, embed: GenStreamEmbed):
        super().__init__()
        self.patch = embed.patch
        self.proj = copy.deepcopy(embed.proj)
        self.register_buffer("pos", embed.pos.detach().clone(), persistent=False)  # (N, C)
        with torch.no_grad():
            t0 = embed.pos.new_zeros(1)
            cond = embed.time(t0)  # (1, C)
            if embed.classes is not None:  # no class given: the null-class row, as GenStreamEmbed picks it
                cond = cond + embed.classes(torch.full((1,), embed.null_class, dtype=torch.long, device=t0.device))
        self.register_buffer("condition", cond[0].detach().clone())  # (C,)

    def forward(self, x: Tensor, t: Tensor | None = None, class_ids: Tensor | None = None) -> Tensor:
        """x: (B, 3, S, S) -> (B, N, C); t and class_ids are ignored (always 0 and none here)."""
        h = self.proj(patchify(x, self.patch))
        h = h + self.pos.to(h.dtype)
        return h + self.condition.to(h.dtype)[None, None, :]


class LatentEncoder(nn.Module):
    """The VAE encoder half a latent detector needs: (B, 3, S, S) in [-1, 1] -> (B, K, s, s) normalised
    posterior means, the values of `FrozenVAE.encode_latents` (diffusers' AutoencoderKL.encode: the
    encoder, then quant_conv where the VAE has one; the mean is the first half of the moments)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = copy.deepcopy(vae.module.encoder).cpu().float()
        quant = getattr(vae.module, "quant_conv", None)
        self.quant_conv = None if quant is None else copy.deepcopy(quant).cpu().float()
        self.channels, self.scale, self.shift = vae.latent_channels, vae.scaling_factor, vae.shift_factor

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return (h[:, : self.channels] - self.shift) * self.scale


def generator_layers_read(model: UniGenDet) -> int:
    """How many leading layers of the generator stream the detection pass runs: 0 when it reads no
    generator keys (no d2g, or no MMSA layer), else the last layer whose keys the detector reads."""
    if not model.cfg.d2g:
        return 0
    return model._last_read_layer("d", len(model.blocks))


def detector_only(model: UniGenDet) -> UniGenDet:
    """A CPU copy of `model` holding only what its detection pass reads (module docstring); its
    `detection_pass` gives the same logits."""
    vae, model._vae = model._vae, None  # the VAE (or its loader) is never copied: see LatentEncoder
    try:
        det = copy.deepcopy(model).cpu().eval()
    finally:
        model._vae = vae
    det.skip_unused = True  # run the generator stream only as far as the detector reads it
    det.gen_head = None
    det.projector = None
    last = generator_layers_read(model)
    det.gen_embed = CleanImageEmbed(model.gen_embed).cpu() if last > 0 else None
    for i, block in enumerate(det.blocks, start=1):
        if i > last and "g" in block.experts:  # "mot": the generator expert of a layer no one reads
            del block.experts["g"]
    for p in det.parameters():
        p.requires_grad_(False)
    return det


class DetectorForExport(nn.Module):
    """uint8 images (B, H, W, 3), any H and W -> p_fake (B,) float32 = sigmoid(logit), label 1 = generated.

    Preprocessing inside: `center_crop_resize` (shorter side to S, center crop, Pillow's antialiased
    bicubic, bit for bit; vertical_first_when_tall: Pillow 13's pass order for tall images, None =
    the installed Pillow's), then the detection pass of `detector_only(model)`."""

    def __init__(self, model: UniGenDet, vertical_first_when_tall: bool | None = None):
        super().__init__()
        self.image_size = model.cfg.image_size
        if vertical_first_when_tall is None:
            vertical_first_when_tall = pillow_runs_tall_images_vertically_first()
        self.vertical_first_when_tall = vertical_first_when_tall
        self.detector = detector_only(model)
        self.dtype = next(self.detector.parameters()).dtype
        reads_latents = model.latent and generator_layers_read(model) > 0
        self.encoder = LatentEncoder(model.vae).requires_grad_(False) if reads_latents else None

    def forward(self, images: Tensor) -> Tensor:
        x = center_crop_resize(images, self.image_size, vertical_first_when_tall=self.vertical_first_when_tall)
        x = x.to(self.dtype)
        latents = None if self.encoder is None else self.encoder(x)  # (B, K, s, s)
        logit = self.detector("det", x, latents=latents).logit  # (B,)
        return torch.sigmoid(logit.float())
