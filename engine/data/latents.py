"""Precomputed latents in shards: one sample's VAE posterior moments as a safetensors member, and the
latent metadata of a pack with its match against a run.

`unigendet data pack --vae VAE_DIR` encodes every image once (the center square resized to
`--image-size`, the crop `data.crop = "center"` gives) and writes beside the image bytes

    KEY.latent.safetensors   one tensor "moments": (2C, h, w) float16, the posterior's mean (channels
                             0..C-1) and log-variance (C..2C-1), as the VAE wrapper's `encode_moments`
                             returns them (before any scaling or shift: the model normalises)

and records in the shards manifest, field "latents" (`LATENT_FIELDS`): the VAE's fingerprint (a hash
of its weights), the folder it was loaded from, the image size, the crop and the moments' shape. A
run reads the moments only when its VAE and image size are those of the pack (`check_latents_match`):
latents of another VAE or size would train the generator on codes its decoder does not read.
safetensors stores raw tensors and a JSON header, so reading a member never runs code from the file.
"""
from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .batch import DataError

LATENT_EXT = "latent.safetensors"  # the member suffix: KEY.latent.safetensors
LATENT_CROP = "center"  # the one crop a pack encodes (data.crop must match)
_TENSOR = "moments"
# The manifest's "latents" object: field -> type (every field required).
LATENT_FIELDS = {"vae_fingerprint": str, "vae": str, "image_size": int, "crop": str, "dtype": str, "shape": list}


def moments_to_bytes(moments: torch.Tensor, name: str) -> bytes:
    """(2C, h, w) moments of the image `name` -> the bytes of its KEY.latent.safetensors member (float16).

    A value beyond float16's range would be stored as Inf: refused, naming the image."""
    if moments.ndim != 3 or moments.shape[0] % 2:
        raise DataError(f"{name}: the VAE returned moments of shape {tuple(moments.shape)}; expected (2C, h, w)")
    half = moments.detach().to("cpu", torch.float16).contiguous()
    if not torch.isfinite(half).all():
        raise DataError(f"{name}: the VAE's moments are not finite in float16 (|value| > 65504 or NaN); "
                        "is VAE_DIR the VAE the model uses?")
    return save_safetensors({_TENSOR: half})


def moments_from_bytes(data: bytes, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The bytes of a KEY.latent.safetensors member -> (2C, h, w) float32; `DataError` naming the member
    `name` when they are not one float16 tensor "moments" (of `shape`, when given)."""
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name}: not a safetensors file ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                        "re-run `unigendet data pack --vae`") from None
    moments = tensors.get(_TENSOR)
    if set(tensors) != {_TENSOR} or moments.dtype != torch.float16 or moments.ndim != 3 or moments.shape[0] % 2:
        found = ", ".join(f"{k}: {v.dtype} {tuple(v.shape)}" for k, v in tensors.items()) or "nothing"
        raise DataError(f"{name}: expected one float16 tensor {_TENSOR!r} of shape (2C, h, w), found {found}")
    if shape is not None and tuple(moments.shape) != tuple(shape):
        raise DataError(f"{name}: moments of shape {tuple(moments.shape)}, the shards manifest says {tuple(shape)}")
    return moments.float()


def read_latent_meta(manifest: dict, path: str) -> dict | None:
    """The validated "latents" field of the shards manifest at `path`; None when the pack has no latents."""
    meta = manifest.get("latents")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: field 'latents' should be an object, got {type(meta).__name__}")
    for key, kind in LATENT_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(f"{path}: field latents.{key} missing or not a {kind.__name__}")
    shape = meta["shape"]
    if (len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape) or shape[0] % 2
            or meta["dtype"] != "float16" or meta["crop"] != LATENT_CROP or meta["image_size"] < 1):
        raise DataError(f"{path}: latents.shape {shape}, dtype {meta['dtype']!r}, crop {meta['crop']!r}, image_size "
                        f"{meta['image_size']}: expected [2C, h, w], 'float16', {LATENT_CROP!r} and a size >= 1")
    return meta


def check_latents_match(meta: dict, where: str, vae_fingerprint: str, image_size: int, crop: str) -> None:
    """Refuse, in one line naming both sides, shards whose latents were packed with another VAE or image
    size than the run's, and a run whose crop is not the one the latents were encoded from."""
    if meta["vae_fingerprint"] != vae_fingerprint or meta["image_size"] != image_size:
        raise DataError(
            f"{where}: the shards' latents were packed with VAE {meta['vae_fingerprint']} ({meta['vae']}) at "
            f"{meta['image_size']} px, this run uses VAE {vae_fingerprint} at data.image_size = {image_size} px; "
            f"pack the image folder again with `unigendet data pack DIR --out NEW --vae VAE_DIR --image-size "
            f"{image_size}` (or train on the image folder: latents are then encoded on the fly)")
    if crop != meta["crop"]:
        raise DataError(
            f"data.crop = {crop!r} cannot be used with the precomputed latents of {where}: they were encoded from "
            f"the {meta['crop']!r} crop (random resized crops would need the encoder every step); set "
            f"--data.crop={meta['crop']} (its horizontal flip, data.flip, is supported), or train on the image "
            "folder to encode on the fly")
