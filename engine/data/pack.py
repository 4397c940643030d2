"""`unigendet data pack DIR --out SHARDS`: write an image folder as webdataset tar shards + DALI index files.

The shards format (file names, members, manifest) is that of engine/data/sources/shards.py, which
reads them. Pack reads the image-folder layout of engine/data/sources/folder.py (real/, optional
fake/, class subfolders; quarantined files left out), decodes every image first with the loaders'
decoder (`check_index`) and refuses to write anything when one fails (the error names it and
`data check`; `--no-verify` skips this for a folder just checked), then writes the samples in a
seeded random order (so streaming readers see mixed shards) with fixed tar metadata: the same folder
and seed give byte-identical shards.

With `--vae VAE_DIR` every image is also encoded once, so training never runs the encoder: the
center square resized to `--image-size` (the crop `data.crop = "center"` gives the detector) goes
through the VAE's encoder, and the posterior's moments are stored beside the image as
KEY.latent.safetensors, float16; the manifest records the VAE's fingerprint and the image size
(engine/data/latents.py), which the loaders check against the run's.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..vae import FrozenVAE, load_vae, vae_fingerprint
from .batch import DataError
from .check import check_index, default_workers
from .images import crop_resize, decode_rgb
from .index import FolderIndex
from .latents import LATENT_CROP, LATENT_EXT, moments_to_bytes
from .quarantine import check_command
from .sources.folder import scan_folder
from .sources.shards import FORMAT, INDEX_VERSION, MANIFEST_NAME, VERSION

DEFAULT_SAMPLES_PER_SHARD = 10_000
DEFAULT_LATENT_IMAGE_SIZE = 256
ENCODE_BATCH = 16  # images per encoder call: bounded memory at 512 px, batched enough for a GPU


def pack_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    seed: int = 0,
    verify: bool = True,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    encode_progress: Callable[[int, int], None] | None = None,
    vae: str | os.PathLike | None = None,
    image_size: int | None = None,
    device: str = "cpu",
) -> dict:
    """Pack the image folder `src` into shards in the new folder `out` (module docstring); returns the manifest.

    verify=False skips decoding every image first (for a folder `data check` has just listed): a bad
    file then goes into the shards, and the loaders stop on it, naming it and `data check SHARDS`.
    vae: a diffusers AutoencoderKL folder (`model.vae`) whose encoder stores each image's moments at
    `image_size` (default 256) px, run on `device`. progress / encode_progress: called with (done, total)
    while the images are checked / encoded.
    """
    src, out = os.fspath(src), os.fspath(out)
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")
    if image_size is not None and vae is None:
        raise DataError(f"--image-size {image_size}: only latents are stored at a size; give --vae VAE_DIR too "
                        "(the image bytes are always stored unchanged)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out}: --out exists and is not an empty folder; remove it or choose another")
    encoder = fingerprint = None
    if vae is not None:  # loaded before any decoding: a missing extra or a bad folder stops at once
        image_size = DEFAULT_LATENT_IMAGE_SIZE if image_size is None else int(image_size)
        encoder = _load_encoder(os.fspath(vae), image_size, device)
        fingerprint = vae_fingerprint(encoder.path)
    index = scan_folder(src)
    result = check_index(index, workers, progress) if verify else None
    if result and result.bad:
        first = result.bad[0]
        raise DataError(
            f"{src}: {len(result.bad)} unreadable image(s), e.g. {first.path} ({first.reason}: {first.detail}); "
            f"nothing was written. Run `{check_command(src)}`: pack then leaves the listed files out"
        )
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed)).tolist()
    os.makedirs(out, exist_ok=True)
    shards = []
    # with --vae: `workers` threads decode and crop the images the encoder reads (PIL releases the GIL)
    with ThreadPoolExecutor(default_workers() if workers is None else max(1, int(workers))) as pool:
        for start in range(0, len(order), samples_per_shard):
            name = f"shard-{len(shards):06d}"
            positions = order[start : start + samples_per_shard]
            latents = (LatentWriter(encoder, image_size, pool, start, len(order), encode_progress)
                       if encoder else None)
            _write_shard(index, positions, first_key=start, tar_path=os.path.join(out, name + ".tar"),
                         latents=latents)
            _write_dali_index(os.path.join(out, name + ".tar"), os.path.join(out, name + ".idx"))
            shards.append({"tar": name + ".tar", "index": name + ".idx", "samples": len(positions)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "classes": index.classes,
        "num_samples": len(index),
        "num_real": index.num_real,
        "num_fake": index.num_fake,
        "seed": seed,
        "source": os.path.abspath(src),
        "quarantined": len(index.skipped),
        "shards": shards,
    }
    if encoder is not None:
        manifest["latents"] = {
            "vae_fingerprint": fingerprint,
            "vae": os.path.abspath(encoder.path),
            "image_size": image_size,
            "crop": LATENT_CROP,
            "dtype": "float16",
            "shape": [2 * encoder.latent_channels, image_size // encoder.downsample, image_size // encoder.downsample],
        }
    _write_atomic(os.path.join(out, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
    return manifest


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with fixed metadata (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _load_encoder(vae: str, image_size: int, device: str) -> FrozenVAE:
    """The frozen VAE of `--vae` on `device`; `--image-size` must be a multiple of its downsampling."""
    if image_size < 1:
        raise DataError(f"--image-size must be >= 1, got {image_size}")
    encoder = load_vae(vae, device)
    if image_size % encoder.downsample:
        raise DataError(f"--image-size {image_size} is not a multiple of {encoder.downsample}, the downsampling "
                        f"factor of the VAE {vae}")
    return encoder


class LatentWriter:
    """Encodes the images of one shard, a chunk at a time (memory stays bounded by the chunk), and
    reports the images encoded so far in the whole pack."""

    def __init__(self, encoder: FrozenVAE, image_size: int, pool: ThreadPoolExecutor, done: int, total: int,
                 progress: Callable[[int, int], None] | None):
        self.encoder, self.image_size, self.pool = encoder, image_size, pool
        self.done, self.total, self.progress = done, total, progress

    def _crop(self, data: bytes, name: str) -> torch.Tensor:
        return crop_resize(decode_rgb(data, name), self.image_size, None)  # (3, S, S) in [-1, 1]

    def members(self, names: list[str], encoded: list[bytes]) -> list[bytes]:
        """The KEY.latent.safetensors bytes of each image (`encoded`, file `names`): its center crop at
        `image_size` (the pixels the loaders give with data.crop = "center", unflipped) through the encoder."""
        images = torch.stack(list(self.pool.map(self._crop, encoded, names)))  # (b, 3, S, S) in [-1, 1]
        moments = self.encoder.encode_moments(images)  # (b, 2C, S/f, S/f) float32
        self.done += len(names)
        if self.progress:
            self.progress(self.done, self.total)
        return [moments_to_bytes(m, name) for m, name in zip(moments, names)]


def _write_shard(index: FolderIndex, positions: list[int], first_key: int, tar_path: str,
                 latents: LatentWriter | None = None) -> None:
    """Write the samples `positions` of `index` as KEY.EXT / KEY.cls / KEY.fake (and KEY.latent.safetensors
    when `latents` encodes them) into `tar_path` (atomically)."""
    tmp = tar_path + ".tmp"
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for start in range(0, len(positions), ENCODE_BATCH):
            chunk = positions[start : start + ENCODE_BATCH]
            encoded = [index.read_bytes(p) for p in chunk]  # one read per image: stored and encoded
            moments = latents.members([index.files[p] for p in chunk], encoded) if latents else [None] * len(chunk)
            for k, p, data, latent in zip(range(first_key + start, first_key + start + len(chunk)), chunk,
                                          encoded, moments):
                _add_sample(tar, f"{k:09d}", index, p, data, latent)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, tar_path)


def _add_sample(tar: tarfile.TarFile, key: str, index: FolderIndex, p: int, data: bytes, latent: bytes | None) -> None:
    """Append sample `p` of `index` (its bytes `data`, its moments member `latent` or None) under `key`."""
    ext = os.path.splitext(index.files[p])[1].lower().lstrip(".")
    fields = ((ext, data), ("cls", str(index.class_ids[p]).encode()), ("fake", str(index.is_fake[p]).encode()))
    if latent is not None:
        fields += ((LATENT_EXT, latent),)
    for suffix, member in fields:
        tar.addfile(_member(f"{key}.{suffix}", len(member)), io.BytesIO(member))


def _write_dali_index(tar_path: str, idx_path: str) -> None:
    """Write DALI's webdataset index of `tar_path` (offsets read back from the archive itself)."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append(entry)
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(entries) for entries in samples]
    _write_atomic(idx_path, "\n".join(lines) + "\n")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
