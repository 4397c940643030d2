"""`unigendet data pack DIR --out SHARDS`: write an image folder as webdataset tar shards + DALI index files.

The shards format (file names, members, manifest) is that of engine/data/sources/shards.py, which
reads them. Pack reads the image-folder layout of engine/data/sources/folder.py (real/, optional
fake/, class subfolders; quarantined files left out), decodes every image first with the loaders'
decoder (`check_index`) and refuses to write anything when one fails (the error names it and
`data check`; `--no-verify` skips this for a folder just checked), then writes the samples in a
seeded random order (so streaming readers see mixed shards) with fixed tar metadata: the same folder
and seed give byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable

import torch

from .batch import DataError
from .check import check_index
from .index import FolderIndex
from .quarantine import check_command
from .sources.folder import scan_folder
from .sources.shards import FORMAT, INDEX_VERSION, MANIFEST_NAME, VERSION

DEFAULT_SAMPLES_PER_SHARD = 10_000


def pack_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    seed: int = 0,
    verify: bool = True,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Pack the image folder `src` into shards in the new folder `out` (module docstring); returns the manifest.

    verify=False skips decoding every image first (for a folder `data check` has just listed): a bad
    file then goes into the shards, and the loaders stop on it, naming it and `data check SHARDS`.
    """
    src, out = os.fspath(src), os.fspath(out)
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out}: --out exists and is not an empty folder; remove it or choose another")
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
    for start in range(0, len(order), samples_per_shard):
        name = f"shard-{len(shards):06d}"
        positions = order[start : start + samples_per_shard]
        _write_shard(index, positions, first_key=start, tar_path=os.path.join(out, name + ".tar"))
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
    _write_atomic(os.path.join(out, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
    return manifest


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with fixed metadata (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_shard(index: FolderIndex, positions: list[int], first_key: int, tar_path: str) -> None:
    """Write the samples `positions` of `index` as KEY.EXT / KEY.cls / KEY.fake into `tar_path` (atomically)."""
    tmp = tar_path + ".tmp"
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for k, p in enumerate(positions):
            key = f"{first_key + k:09d}"
            ext = os.path.splitext(index.files[p])[1].lower().lstrip(".")
            fields = ((ext, index.read_bytes(p)), ("cls", str(index.class_ids[p]).encode()),
                      ("fake", str(index.is_fake[p]).encode()))
            for suffix, data in fields:
                tar.addfile(_member(f"{key}.{suffix}", len(data)), io.BytesIO(data))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, tar_path)


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
