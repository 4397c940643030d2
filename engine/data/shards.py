"""Webdataset tar shards: `unigendet data pack DIR --out SHARDS` writes them, `scan_shards` indexes them.

A shards folder holds

    SHARDS/shard-000000.tar        webdataset samples: KEY.EXT (the image file's bytes, unchanged),
                                   KEY.cls (class id, decimal text, -1 = none) and KEY.fake ("0" real,
                                   "1" generated); KEY is the sample number, 9 digits
    SHARDS/shard-000000.idx        its DALI index (the format of DALI's `wds2idx`: "v1.2 N", then per
                                   sample "EXT OFFSET SIZE NAME" for each member), so the shards also
                                   feed `nvidia.dali.fn.readers.webdataset(paths, index_paths=...)`
    SHARDS/unigendet_shards.json   manifest: format version, classes, shards and their sample counts;
                                   written last, so a folder with a manifest is a complete pack

Pack reads the image-folder layout of engine/data/folder.py (real/, optional fake/, class
subfolders; quarantined files left out), decodes every image first with the loaders' decoder and
refuses to write anything when one fails (the error names it and `data check`; `--no-verify` skips
this for a folder just checked), then writes the
samples in a seeded random order (so streaming readers see mixed shards) with fixed tar metadata:
the same folder and seed give byte-identical shards.

The loaders read shards by random access: the index gives each image's offset in its tar, so the
epoch permutation, the rank sharding, the crops and the resumable position are exactly those of an
image folder (`FolderLoader`). A shards folder is a data root like any other: `data.root`,
`eval.data` and `unigendet data check` accept it; quarantine list names are "SHARD.tar:MEMBER".
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable

import torch

from .batch import DataError
from .folder import FolderIndex, command_for, drop_quarantined, scan_folder
from .images import is_image_file, open_regular
from .quarantine import resolve_quarantine

MANIFEST_NAME = "unigendet_shards.json"
FORMAT = "unigendet-webdataset"
VERSION = 1
INDEX_VERSION = "v1.2"  # DALI's webdataset index format
DEFAULT_SAMPLES_PER_SHARD = 10_000
_LABEL_EXTS = ("cls", "fake")


def is_shards_root(root: str | os.PathLike) -> bool:
    """True when `root` is a shards folder: it has a manifest, or tar files directly inside (an
    incomplete pack, which `scan_shards` then reports)."""
    root = os.fspath(root)
    if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        return True
    return os.path.isdir(root) and not os.path.isdir(os.path.join(root, "real")) and any(
        name.endswith(".tar") for name in os.listdir(root))


# ---------------------------------------------------------------------------------------------- pack


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
    from .check import check_index  # check imports folder, which imports this module lazily

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
            f"nothing was written. Run `{command_for(src)}`: pack then leaves the listed files out"
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


# ---------------------------------------------------------------------------------------------- scan


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
    index = FolderIndex(files=[], is_fake=[], class_ids=[], classes=classes, root=root)
    for shard in manifest["shards"]:
        tar_path = os.path.join(root, shard["tar"])
        entries = read_dali_index(os.path.join(root, shard["index"]), tar_path)
        if len(entries) != shard["samples"]:
            raise DataError(f"{os.path.join(root, shard['index'])}: {len(entries)} samples, the manifest "
                            f"says {shard['samples']}")
        with os.fdopen(open_regular(tar_path), "rb") as f:  # a FIFO or device named *.tar is refused
            for components in entries:
                image, labels = _split_components(components, tar_path)
                is_fake, class_id = _read_labels(f.fileno(), labels, tar_path, len(classes))
                index.files.append(os.path.join(root, f"{shard['tar']}:{image[3]}"))
                index.members.append((tar_path, image[1], image[2]))
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


def _split_components(components, tar_path):
    """(the image member, {label ext: member}) of one sample; errors name the sample."""
    images = [c for c in components if is_image_file(c[3])]
    labels = {c[0]: c for c in components if c[0] in _LABEL_EXTS}
    if len(images) != 1 or set(labels) != set(_LABEL_EXTS):
        names = " ".join(c[3] for c in components)
        raise DataError(f"{tar_path}: sample ({names}) needs one image member and .cls and .fake members")
    return images[0], labels


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
