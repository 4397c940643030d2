"""The frozen image autoencoder of the latent path: a diffusers `AutoencoderKL` folder (SD-VAE, SDXL-VAE,
FLUX-VAE), loaded from disk only, never trained.

    vae = load_vae("vaes/flux")                     # frozen, eval mode; bf16 on CUDA, fp32 on CPU
    moments = vae.encode_moments(images)            # (B, 2C, h, w) fp32: posterior mean, log-variance
    latents = vae.sample_latents(moments, gen)      # (B, C, h, w) normalised: (z - shift) * scale
    means = vae.encode_latents(images)              # (B, C, h, w) normalised posterior means
    images = vae.decode(latents)                    # (B, 3, H, W), differentiable w.r.t. the latents

The generator stream works on normalised latents; the detector stream reads pixels (decoded ones for
generated images), and with model.d2g a detection sample's generator stream reads the posterior means
of those same pixels.
diffusers is imported only by `load_vae` (the `vae` extra), so the pixel path never needs it. This
module imports nothing else of the package: the data layer and the trainer both use it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

VAE_EXTRA = "vae"  # pip install ".[vae]" provides diffusers
WEIGHT_SUFFIXES = (".safetensors", ".bin")
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp diffusers' DiagonalGaussianDistribution applies


def vae_dtype(device: str | torch.device) -> torch.dtype:
    """The VAE's weight dtype on `device`: bf16 on CUDA (as the published VAEs run), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class VAEError(ValueError):
    """The VAE folder is missing, unreadable or not an AutoencoderKL; the message (one line) names it."""


def sample_latents(moments: Tensor, generator: torch.Generator | None, scaling_factor: float,
                   shift_factor: float = 0.0) -> Tensor:
    """(B, 2C, h, w) moments -> (B, C, h, w) normalised latents (mean + std * eps - shift) * scale, fp32.

    eps is drawn on the generator's device (CPU for a CPU generator) and then moved, so the same
    generator state gives the same latents wherever the moments live (packed moments and on-the-fly
    encoding agree when their moments do)."""
    mean, logvar = moments.float().chunk(2, dim=1)  # (B, C, h, w) each
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
    return (mean + std * eps - shift_factor) * scaling_factor


class FrozenVAE:
    """A loaded `AutoencoderKL` with its latent normalisation; no parameter ever needs a gradient.

    Not an nn.Module on purpose: it must stay out of the model's parameters, state dicts, optimizer
    and checkpoints (a checkpoint records only the VAE's path and fingerprint)."""

    def __init__(self, autoencoder, path: str | Path):
        self.module = autoencoder.eval().requires_grad_(False)
        self.path = str(path)
        config = autoencoder.config
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)  # pixels per latent cell, per side
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)  # SD-VAEs have none

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device) -> FrozenVAE:
        """Move to `device` in that device's dtype (bf16 on CUDA, fp32 elsewhere)."""
        device = torch.device(device)
        self.module.to(device)
        if self.dtype != vae_dtype(device):
            self.module.to(vae_dtype(device))
        return self

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/f, W/f) fp32: the posterior's mean and log-variance."""
        self._check_pixels(images)
        params = self.module.encode(images.to(self.device, self.dtype)).latent_dist.parameters  # (B, 2C, h, w)
        mean, logvar = params.float().chunk(2, dim=1)
        return torch.cat([mean, logvar.clamp(*LOGVAR_RANGE)], dim=1)

    def sample_latents(self, moments: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, 2C, h, w) -> (B, C, h, w) normalised latents with this VAE's scale and shift."""
        if moments.ndim != 4 or moments.shape[1] != 2 * self.latent_channels:
            raise VAEError(f"{self.path}: latent moments must be (B, {2 * self.latent_channels}, h, w) for this "
                           f"VAE ({self.latent_channels} latent channels), got {tuple(moments.shape)}")
        return sample_latents(moments, generator, self.scaling_factor, self.shift_factor)

    def mean_latents(self, moments: Tensor) -> Tensor:
        """(B, 2C, h, w) moments -> (B, C, h, w) the normalised posterior means (no sampling noise): the
        latents a detection sample's generator stream reads (model.d2g)."""
        mean = moments.float()[:, : self.latent_channels]
        return (mean - self.shift_factor) * self.scaling_factor

    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) fp32 normalised posterior means. Differentiable
        w.r.t. the images (the detection pass of L_auth encodes decode(x0_hat)); the weights never get a
        gradient."""
        self._check_pixels(images)
        mean = self.module.encode(images.to(self.dtype)).latent_dist.mean.float()
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, h*f, w*f) fp32 images, about [-1, 1] (not clamped:
        a clamp would stop the gradient of saturated pixels). Differentiable w.r.t. the latents; the
        VAE's weights never get a gradient (requires_grad is off)."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.module.decode(z.to(self.dtype)).sample.float()

    def _check_pixels(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise VAEError(f"{self.path}: encode needs images (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % self.downsample or images.shape[3] % self.downsample:
            raise VAEError(f"{self.path}: image size {tuple(images.shape[2:])} is not a multiple of the VAE's "
                           f"downsampling factor {self.downsample}")


def _import_autoencoder():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError(f"model.vae needs the diffusers package ({e}); install the extra: "
                       f'pip install ".[{VAE_EXTRA}]"') from None
    return AutoencoderKL


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise VAEError(f"{path}: model.vae must be a folder in diffusers format (config.json and weights); "
                       "it does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise VAEError(f"{path}: not a diffusers AutoencoderKL folder: no config.json")
    if not weight_files(path):
        raise VAEError(f"{path}: not a diffusers AutoencoderKL folder: no weight file "
                       f"({' / '.join('*' + s for s in WEIGHT_SUFFIXES)})")


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> FrozenVAE:
    """Load the `AutoencoderKL` in `path` (local files only: nothing is downloaded), frozen, eval mode,
    in bf16 on CUDA and fp32 elsewhere."""
    path = Path(path)
    _check_folder(path)
    autoencoder_cls = _import_autoencoder()
    try:
        autoencoder = autoencoder_cls.from_pretrained(str(path), local_files_only=True, torch_dtype=vae_dtype(device),
                                                      low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, ... for a bad folder
        detail = " ".join(str(e).split())[:300]
        raise VAEError(f"{path}: cannot load it as a diffusers AutoencoderKL: {type(e).__name__}: {detail}") from None
    if type(autoencoder).__name__ != "AutoencoderKL":
        raise VAEError(f"{path}: expected an AutoencoderKL, got {type(autoencoder).__name__}")
    return FrozenVAE(autoencoder, path).to(device)


def read_vae_geometry(path: str | Path) -> tuple[int, int]:
    """(latent channels, downsampling factor) from the folder's config.json, without diffusers."""
    import json

    path = Path(path)
    _check_folder(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        channels, blocks = int(config["latent_channels"]), config["block_out_channels"]
        return channels, 2 ** (len(blocks) - 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VAEError(f"{path / 'config.json'}: not an AutoencoderKL config ({type(e).__name__}: {e})") from None


def weight_files(path: str | Path) -> list[Path]:
    """The folder's weight files (top level), sorted by name."""
    return sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def vae_fingerprint(path: str | Path) -> str:
    """sha256 over the VAE's config.json and weight files (each name, then its bytes, in name order):
    a checkpoint records it so that resume and eval refuse a different VAE under the same path."""
    path = Path(path)
    _check_folder(path)
    digest = hashlib.sha256()
    for file in [path / "config.json", *weight_files(path)]:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
