"""The `Batch` contract between the data loaders and the trainer.

Every loader (PIL today, DALI later) yields `Batch` objects with the same fields, dtypes and value
ranges, so the model and the training phases never depend on where the pixels came from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """Bad data; the message names the file or field."""


@dataclass
class Batch:
    """One training batch of images with their detection labels and classes.

    Label convention (also printed by the CLI): `is_fake = 1.0` marks a generated image (an external
    fake read from `fake/`), `0.0` a real photograph. `class_ids` is -1 when the dataset has no
    classes (and for fake images that sit directly under `fake/` in a class dataset).
    """

    images: torch.Tensor  # (B, 3, S, S) float32 in [-1, 1]
    is_fake: torch.Tensor  # (B,) float32: 1.0 = generated image, 0.0 = real
    class_ids: torch.Tensor  # (B,) int64 class index, -1 when unknown / no classes
    # (B, 2C, h, w) float32: the VAE posterior's moments of the same crop as `images` (mean, then
    # log-variance, along dim 1), read from shards `data pack --vae` wrote; None = no precomputed latents
    latent_moments: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device, non_blocking: bool = False) -> Batch:
        """Return a copy of the batch on `device` (use `non_blocking` with pinned memory)."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            is_fake=self.is_fake.to(device, non_blocking=non_blocking),
            class_ids=self.class_ids.to(device, non_blocking=non_blocking),
            latent_moments=None if self.latent_moments is None else self.latent_moments.to(
                device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy; `torch.utils.data.DataLoader(pin_memory=True)` calls this."""
        moments = None if self.latent_moments is None else self.latent_moments.pin_memory()
        return Batch(self.images.pin_memory(), self.is_fake.pin_memory(), self.class_ids.pin_memory(), moments)

    def validate(self) -> None:
        """Check shapes, dtypes and value ranges; raise `DataError` naming the bad field.

        Reads the values (a host sync on GPU): meant for loaders, tests and user-supplied batches,
        not for the captured training step.
        """
        images, is_fake, class_ids = self.images, self.is_fake, self.class_ids
        for name, value in (("images", images), ("is_fake", is_fake), ("class_ids", class_ids)):
            if not isinstance(value, torch.Tensor):
                raise DataError(f"Batch.{name}: expected a torch.Tensor, got {type(value).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise DataError(f"Batch.images: expected shape (B, 3, S, S), got {tuple(images.shape)}")
        if images.dtype != torch.float32:
            raise DataError(f"Batch.images: expected dtype float32, got {images.dtype}")
        batch_size = images.shape[0]
        if batch_size == 0:
            raise DataError("Batch.images: empty batch (B = 0)")
        if images.numel() and not torch.isfinite(images).all():
            raise DataError("Batch.images: contains NaN or Inf")
        low, high = images.min().item(), images.max().item()
        if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
            raise DataError(f"Batch.images: values must lie in [-1, 1], got [{low:.4g}, {high:.4g}]")

        if is_fake.shape != (batch_size,):
            raise DataError(f"Batch.is_fake: expected shape ({batch_size},), got {tuple(is_fake.shape)}")
        if is_fake.dtype != torch.float32:
            raise DataError(f"Batch.is_fake: expected dtype float32, got {is_fake.dtype}")
        if not ((is_fake >= 0) & (is_fake <= 1)).all():
            raise DataError("Batch.is_fake: labels must lie in [0, 1] (1 = generated, 0 = real)")

        if class_ids.shape != (batch_size,):
            raise DataError(f"Batch.class_ids: expected shape ({batch_size},), got {tuple(class_ids.shape)}")
        if class_ids.dtype != torch.int64:
            raise DataError(f"Batch.class_ids: expected dtype int64, got {class_ids.dtype}")
        if (class_ids < -1).any():
            raise DataError("Batch.class_ids: class ids must be >= -1 (-1 = no class)")

        moments = self.latent_moments
        if moments is None:
            return
        if not isinstance(moments, torch.Tensor):
            raise DataError(f"Batch.latent_moments: expected a torch.Tensor or None, got {type(moments).__name__}")
        if moments.ndim != 4 or moments.shape[0] != batch_size or moments.shape[1] % 2:
            raise DataError(f"Batch.latent_moments: expected shape ({batch_size}, 2C, h, w), got "
                            f"{tuple(moments.shape)}")
        if moments.dtype != torch.float32:
            raise DataError(f"Batch.latent_moments: expected dtype float32, got {moments.dtype}")
        if not torch.isfinite(moments).all():
            raise DataError("Batch.latent_moments: contains NaN or Inf")


def collate_samples(samples: list[tuple]) -> Batch:
    """Stack dataset items `(image (3, S, S), is_fake, class_id)`, or `(..., moments (2C, h, w))` with
    precomputed latents, into a `Batch`.

    Module-level so that DataLoader worker processes can pickle it as `collate_fn`.
    """
    images, is_fake, class_ids, *moments = zip(*samples)
    return Batch(
        images=torch.stack(images),  # (B, 3, S, S)
        is_fake=torch.tensor(is_fake, dtype=torch.float32),  # (B,)
        class_ids=torch.tensor(class_ids, dtype=torch.int64),  # (B,)
        latent_moments=torch.stack(moments[0]) if moments else None,  # (B, 2C, h, w)
    )
