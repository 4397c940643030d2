"""Webdataset tar shards as a data root: `scan_shards` indexes them, `read_shard_member` reads a sample.

A shards folder (written by `unigendet data pack`, engine/data/pack.py) holds

    SHARDS/shard-000000.tar        webdataset samples: KEY.EXT (the image file's bytes, unchanged),
                                   KEY.cls (class id, decimal text, -1 = none) and KEY.fake ("0" real,
                                   "1" generated); KEY is the sample number, 9 digits; packed with
                                   --vae also KEY.latent.safetensors, the image's VAE posterior
                                   moments (engine/data/latents.py)
    SHARDS/shard-000000.idx        its DALI index (the format of DALI's `wds2idx`: "v1.2 N", then per
                                   sample "EXT OFFSET SIZE NAME" for each member), so the shards also
                                   feed `nvidia.dali.fn.readers.webdataset(paths, index_paths=...)`
    SHARDS/unigendet_shards.json   manifest: format version, classes, shards and their sample counts,
                                   the latents' VAE fingerprint and image size when packed with --vae;
                                   written last, so a folder with a manifest is a complete pack

The loaders read shards by random access: the index gives each image's offset in its tar, so the
epoch permutation, the rank sharding, the crops and the resumable position are exactly those of an
image folder (`FolderLoader`). A shards folder is a data root like any other: `data.root`,
`eval.data` and `unigendet data check` accept it; quarantine list names are "SHARD.tar:MEMBER".
Every file name a manifest or index gives must stay inside the shards folder.
"""
from __future__ import annotations

import json
import os

from ..batch import DataError
from ..images import UnreadableFile, is_image_file, open_regular
from ..index import FolderIndex
from ..latents import LATENT_EXT, read_latent_meta
from ..quarantine import drop_quarantined, resolve_quarantine

MANIFEST_NAME = "unigendet_shards.json"
FORMAT = "unigendet-webdataset"
VERSION = 1
INDEX_VERSION = "v1.2"  # DALI's webdataset index format
_LABEL_EXTS = ("cls", "fake")


def is_shards_root(root: str | os.PathLike) -> bool:
    """True when `root` is a shards folder: it has a manifest, or tar files directly inside (an
    incomplete pack, which `scan_shards` then reports)."""
    root = os.fspath(root)
    if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        return True
    return os.path.isdir(root) and not os.path.isdir(os.path.join(root, "real")) and any(
        name.endswith(".tar") for name in os.listdir(root))


def read_shard_member(index: FolderIndex, i: int) -> bytes:
    """The `FolderIndex.reader` of shards: sample i is `index.locations[i]` = (tar path, byte offset,
    byte count), read with one `pread`; `UnreadableFile` naming the member when that fails."""
    return _pread_member(index.locations[i], index.files[i], index.max_bytes)


def read_shard_latent(index: FolderIndex, i: int) -> bytes:
    """The `FolderIndex.latent_reader` of shards: sample i's KEY.latent.safetensors member, at
    `index.latent_locations[i]` = (tar path, byte offset, byte count)."""
    tar, offset, size = index.latent_locations[i]
    name = f"{os.path.splitext(index.files[i])[0]}.{LATENT_EXT}"  # ROOT/SHARD.tar:KEY.latent.safetensors
    return _pread_member((tar, offset, size), name, index.max_bytes)


def _pread_member(location: tuple[str, int, int], name: str, limit: int) -> bytes:
    tar, offset, size = location
    if size > limit:
        raise UnreadableFile(name, "too_large", f"{size} bytes, more than data.max_file_mb = {limit // 2**20} MiB")
    fd = open_regular(tar, name)
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise UnreadableFile(name, "corrupt", exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)
    if len(data) != size:
        raise UnreadableFile(name, "corrupt", f"{tar} ends at byte {offset + len(data)}, the index says "
                             f"{offset + size}")
    return data


def read_manifest(root: str) -> dict:
    """The validated manifest of the shards folder `root` (errors name the file and the field)."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; {root} holds tar files but no manifest (an interrupted "
                        "`unigendet data pack`? run it again into an empty folder)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the shards manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a unigendet shards manifest (field 'format' should be {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: shards format version {manifest.get('version')!r}; this unigendet reads "
                        f"version {VERSION}: pack the image folder again with this version")
    for key, kind in (("classes", list), ("shards", list), ("num_samples", int)):
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    for k, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("tar"), str) and isinstance(shard.get("index"), str)
                and isinstance(shard.get("samples"), int)):
            raise DataError(f"{path}: shards[{k}] needs 'tar' and 'index' (file names) and 'samples' (int)")
        for key in ("tar", "index"):
            _check_inside(root, shard[key], f"{path}: shards[{k}].{key}")
    read_latent_meta(manifest, path)  # validated here, so a bad field is reported before any sample
    return manifest


def _check_inside(root: str, name: str, where: str) -> None:
    """A file name a manifest or index gives must be relative and resolve (symlinks too) to a path
    strictly inside the shards folder `root`: nothing outside it is ever read or trained on."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, name))
    if (not name or "\0" in name or os.path.isabs(name) or real == real_root
            or os.path.commonpath([real_root, real]) != real_root):
        raise DataError(f"{where} = {name!r} is not a file inside the shards folder {root} (paths there must be "
                        f"relative and stay inside it, symlinks resolved)")


def scan_shards(root: str | os.PathLike, quarantine: str | os.PathLike | None = "") -> FolderIndex:
    """Index a shards folder for the loaders (quarantine rules as in `scan_folder`)."""
    root = os.fspath(root)
    manifest = read_manifest(root)
    classes = [str(c) for c in manifest["classes"]]
    index = FolderIndex(files=[], is_fake=[], class_ids=[], reader=read_shard_member, classes=classes, root=root)
    index.latents = read_latent_meta(manifest, os.path.join(root, MANIFEST_NAME))
    if index.latents is not None:
        index.latent_reader = read_shard_latent
    for shard in manifest["shards"]:
        tar_path = os.path.join(root, shard["tar"])
        entries = read_dali_index(os.path.join(root, shard["index"]), tar_path)
        if len(entries) != shard["samples"]:
            raise DataError(f"{os.path.join(root, shard['index'])}: {len(entries)} samples, the manifest "
                            f"says {shard['samples']}")
        with os.fdopen(open_regular(tar_path), "rb") as f:  # a FIFO or device named *.tar is refused
            for components in entries:
                image, labels, latent = _split_components(components, tar_path, index.latents is not None)
                is_fake, class_id = _read_labels(f.fileno(), labels, tar_path, len(classes))
                index.files.append(os.path.join(root, f"{shard['tar']}:{image[3]}"))
                index.locations.append((tar_path, image[1], image[2]))
                if latent is not None:
                    index.latent_locations.append((tar_path, latent[1], latent[2]))
                index.is_fake.append(is_fake)
                index.class_ids.append(class_id)
    if len(index) != manifest["num_samples"]:
        raise DataError(f"{os.path.join(root, MANIFEST_NAME)}: num_samples {manifest['num_samples']}, the "
                        f"shards hold {len(index)}")
    if index.num_real == 0:
        raise DataError(f"{root}: the shards hold no real image (label 0)")
    listed = resolve_quarantine(root, quarantine)
    return drop_quarantined(index, listed) if listed else index


def read_dali_index(idx_path: str, tar_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Samples of a DALI webdataset index: per sample [(ext, offset, size, member name), ...]."""
    try:
        with os.fdopen(open_regular(idx_path), encoding="utf-8") as f:
            lines = f.read().split("\n")  # only "\n" ends a line: member names may hold \f, U+2028, ...
        while lines and not lines[-1]:
            lines.pop()
        tar_size = os.path.getsize(tar_path)
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot read ({exc.strerror}); re-run `unigendet data pack`") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{idx_path}: not a DALI webdataset index (byte {exc.start} is not UTF-8 text); re-run "
                        "`unigendet data pack`") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise DataError(f"{idx_path}: line 1 should be '{INDEX_VERSION} <samples>' (DALI webdataset index)")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise DataError(f"{idx_path}: line {number}: expected 'ext offset size name' per member")
        components = []
        for j in range(0, len(fields), 4):
            ext, offset, size, name = fields[j : j + 4]
            if name.startswith("/") or ".." in name.split("/"):  # a member name, never a path to follow
                raise DataError(f"{idx_path}: line {number}: member name {name!r} is absolute or climbs out "
                                "with '..'")
            if not (offset.isdigit() and size.isdigit()) or int(offset) + int(size) > tar_size:
                raise DataError(f"{idx_path}: line {number}: member {name} at {offset}+{size} lies outside "
                                f"{tar_path} ({tar_size} bytes): a truncated or replaced shard")
            components.append((ext, int(offset), int(size), name))
        samples.append(components)
    if len(samples) != int(head[1]):
        raise DataError(f"{idx_path}: header says {head[1]} samples, {len(samples)} listed")
    return samples


def _split_components(components, tar_path, with_latents: bool):
    """(the image member, {label ext: member}, the latent member or None) of one sample; errors name
    the sample. with_latents: the manifest says the pack has latents, so every sample needs one."""
    images = [c for c in components if is_image_file(c[3])]
    labels = {c[0]: c for c in components if c[0] in _LABEL_EXTS}
    latents = [c for c in components if c[0] == LATENT_EXT]
    if len(images) != 1 or set(labels) != set(_LABEL_EXTS):
        names = " ".join(c[3] for c in components)
        raise DataError(f"{tar_path}: sample ({names}) needs one image member and .cls and .fake members")
    if with_latents and len(latents) != 1:
        names = " ".join(c[3] for c in components)
        raise DataError(f"{tar_path}: sample ({names}) needs one .{LATENT_EXT} member: the manifest says the "
                        "shards hold precomputed latents")
    return images[0], labels, latents[0] if with_latents else None


def _read_labels(fd: int, labels: dict, tar_path: str, num_classes: int) -> tuple[int, int]:
    """(is_fake, class_id) from a sample's .fake and .cls members (one read covering both)."""
    first = min(c[1] for c in labels.values())
    end = max(c[1] + c[2] for c in labels.values())
    span = os.pread(fd, end - first, first)
    text = {ext: span[c[1] - first : c[1] - first + c[2]].decode("ascii", "replace").strip()
            for ext, c in labels.items()}
    try:
        is_fake, class_id = int(text["fake"]), int(text["cls"])
    except ValueError:
        is_fake = class_id = None
    if is_fake not in (0, 1) or class_id is None or not -1 <= class_id < num_classes:
        member = labels["cls"][3].partition(".")[0]
        raise DataError(f"{tar_path}: sample {member}: labels .fake={text['fake']!r} .cls={text['cls']!r}; "
                        f"expected 0/1 and a class id in [-1, {num_classes})")
    return is_fake, class_id
