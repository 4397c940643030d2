"""`load_eval_images`: the deterministic evaluation set of a data root, as tensors."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from .batch import DataError, collate_samples
from .images import max_bytes
from .loaders.pil import FolderDataset, stop_workers, worker_message
from .sources import scan_data


def load_eval_images(
    root: str | os.PathLike,
    image_size: int,
    max_images: int | None = None,
    *,
    num_workers: int = 0,
    quarantine: str | os.PathLike | None = "",
    max_file_mb: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic evaluation set: (images (N, 3, S, S) in [-1, 1], is_fake (N,) float32).

    The first `max_images` real images (sorted order), then, separately, up to `max_images` fakes;
    eval transform (shorter side to S, center crop, no flip). Quarantined files are skipped as in
    `scan_folder` (`quarantine` "" = the default list of `root`, when it exists).
    """
    if max_images is not None and max_images < 1:
        raise DataError(f"max_images must be >= 1 or None, got {max_images}")
    index = scan_data(root, quarantine)
    index.max_bytes = max_bytes(max_file_mb)
    real = [p for p, fake in enumerate(index.is_fake) if not fake][:max_images]
    fake = [p for p, fake in enumerate(index.is_fake) if fake][:max_images]
    dataset = FolderDataset(index.subset(real + fake), image_size, seed=0, train=False)
    loader = DataLoader(
        dataset, batch_size=64, num_workers=num_workers, collate_fn=collate_samples, generator=torch.Generator()
    )
    batch_iter = iter(loader)
    try:
        batches = list(batch_iter)
    except DataError as exc:
        raise DataError(worker_message(exc)) from None
    finally:
        stop_workers(batch_iter)
    return torch.cat([b.images for b in batches]), torch.cat([b.is_fake for b in batches])
