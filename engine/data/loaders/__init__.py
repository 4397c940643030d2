"""Training loaders over a data root: `pil` (PIL + DataLoader workers, `FolderLoader`) or `dali`
(an NVIDIA DALI pipeline, `DaliLoader`); `build_loader` picks one. `LOADER_NAMES` are the values of
`data.loader` (engine/config.py takes its choices from here).
"""
from __future__ import annotations

import os
from typing import Literal, get_args

from ..batch import DataError
from ..images import max_bytes
from ..sources import scan_data
from . import dali as dali_loader  # the module, not its names: tests replace `dali_reason` in it
from .pil import FolderLoader

LoaderName = Literal["auto", "pil", "dali"]
LOADER_NAMES: tuple[str, ...] = get_args(LoaderName)


def build_loader(
    root: str | os.PathLike,
    image_size: int,
    batch_size: int,
    *,
    seed: int = 0,
    crop: str = "random_resized",
    crop_scale_min: float = 0.6,
    flip: bool = True,
    num_workers: int = 2,
    loader: LoaderName = "auto",
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    quarantine: str | os.PathLike | None = "",
    device: str = "cpu",
    max_file_mb: int | None = None,
    vae_fingerprint: str | None = None,
    cache_mb: int = 0,
) -> FolderLoader:
    """The training loader for `data.root`. `loader` (`data.loader`): "pil" (PIL + DataLoader workers),
    "dali" (engine/data/loaders/dali.py: decoding on `device`, nvJPEG on a GPU) or "auto" (DALI on a GPU
    when it is installed, else PIL: on a CPU the PIL workers are the measured default).

    `quarantine` (`data.quarantine`): the list of bad files to skip; "" = ROOT/.unigendet_quarantine.tsv
    when it exists (see `scan_folder`). `max_file_mb` (`data.max_file_mb`, None = the default): larger
    files are unreadable.

    `crop` (`data.crop`): "random_resized" or "center". `vae_fingerprint` (`vae_fingerprint(model.vae)`,
    None = a pixel-space run): shards packed with that VAE at `image_size` give batches with
    `latent_moments` (`loader.latents`); shards packed with another VAE or size, or read with a crop
    other than "center", are refused (engine/data/latents.py). `cache_mb` (`data.cache_mb`): decoded
    images the PIL loader keeps in memory per process (DALI decodes in its pipeline every time).
    """
    if loader not in LOADER_NAMES:
        *first, last = (repr(name) for name in LOADER_NAMES)
        raise DataError(f"data.loader = {loader!r}: expected {', '.join(first)} or {last}")
    kwargs = dict(seed=seed, crop=crop, crop_scale_min=crop_scale_min, flip=flip, num_workers=num_workers,
                  rank=rank, world_size=world_size, pin_memory=pin_memory, vae_fingerprint=vae_fingerprint)
    index = scan_data(root, quarantine)
    index.max_bytes = max_bytes(max_file_mb)
    if loader == "auto":
        loader = "dali" if str(device).startswith("cuda") and dali_loader.dali_reason() is None else "pil"
    if loader == "dali":
        return dali_loader.DaliLoader(index, image_size, batch_size, device=str(device), **kwargs)
    return FolderLoader(index, image_size, batch_size, cache_mb=cache_mb, **kwargs)
