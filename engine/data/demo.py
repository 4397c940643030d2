"""The embedded demo dataset: multi-scale crops of the real photographs shipped in scikit-image.

`write_demo_dataset` needs no network: every source below is read from files inside the
scikit-image wheel (loaders that need `pooch` downloads are not used). Output:

    out_dir/train/real/00000.jpg ...   JPEG (quality 92), size x size
    out_dir/val/real/00000.jpg ...
    out_dir/heldout_real/SOURCE/00000.jpg ...   photographs of other sources, never trained on
    out_dir/demo.json                  parameters, the sources of each split and counts; written last = complete

The split is by source photograph, never by crop: the held-out photographs (`VAL_PHOTOS`, one of
each kind in `PHOTO_KINDS`, the same for every seed) give only val/ crops, every other photograph
and the face set give only train/ crops, so evaluating on val/ does not reward memorising the
training photographs. The face set has no identity labels (its non-faces come from the same LFW
photographs), so it stays whole, in train/.

heldout_real/ holds crops of photographs of other sources (`HELDOUT_PHOTOS`: scikit-learn's sample
images and scikit-image photographs the splits above do not use), one folder per photograph, cropped
and encoded as the others, from a random stream of their own (train/ and val/ are the bytes they were
before the folder existed). No config trains on them: they measure the detector's false-positive rate
on real photographs unlike any it saw (`unigendet eval --real-sources DIR/heldout_real`).

The same (size, seed) gives the same bytes (with the same Pillow build): crops are drawn from
`random.Random(seed)`, whose `random()` sequence Python keeps stable across versions.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import random
import re

import numpy as np
import skimage.data  # cheap: a photograph is read only when its loader function is called
from PIL import Image

from .batch import DataError

# skimage.data loaders that read real photographs from the wheel itself (checked offline, 0.26), by
# kind. `cat` is `chelsea` again, `stereo_motorcycle` returns (left, right, disparity): the left view is used.
PHOTO_KINDS = {
    "colour scene": ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle"),
    "grayscale scene": ("camera", "coins"),
    "texture": ("brick", "grass", "gravel"),
    "science": ("moon", "hubble_deep_field", "retina", "immunohistochemistry"),
}
PHOTO_SOURCES = tuple(name for names in PHOTO_KINDS.values() for name in names)
# The held-out photographs: one of each kind, so val/ spans the kinds train/ has (every kind keeps
# at least one training photograph). Fixed, not seeded: every seed is evaluated on the same photographs.
VAL_PHOTOS = ("coffee", "camera", "gravel", "immunohistochemistry")
CROPS_PER_PHOTO = 70  # per training photograph
VAL_CROPS_PER_PHOTO = 50  # per held-out photograph: 4 x 50 = 200 val images (the demo evaluates 150)
CROP_SIDE_RANGE = (0.15, 0.70)  # crop side as a fraction of the photo's shorter side (log-uniform)
JPEG_QUALITY = 92
FACES_SOURCE = "lfw_subset"
# Held-out real photographs of other sources: (name, where in the installed wheels). Read from files
# inside the wheels only (never a download); an unavailable one is skipped.
HELDOUT_PHOTOS = (
    ("china", "sklearn:datasets/images/china.jpg"),  # colour scene
    ("flower", "sklearn:datasets/images/flower.jpg"),  # colour close-up
    ("clock", "skimage:clock"),  # grayscale indoor scene with motion blur
    ("text", "skimage:text"),  # grayscale photograph of text
    ("cell", "skimage:cell"),  # microscopy
)
HELDOUT_CROPS_PER_PHOTO = 50
HELDOUT_DIR = "heldout_real"
# 1: crops split at random, a photograph fed both splits; 2: split by photograph; 3: + heldout_real/
_FORMAT_VERSION = 3
_MANIFEST = "demo.json"
_FILE_NAME = re.compile(r"^\d{5}\.jpg$")


def _as_rgb_image(array: np.ndarray) -> Image.Image:
    """skimage array ((H, W) or (H, W, 3|4), uint8, float in [0, 1] or bool) -> 8-bit RGB image."""
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    return Image.fromarray(array).convert("RGB")


def _load_photos() -> list[tuple[str, Image.Image]]:
    """The available offline photographs as (name, RGB image); unavailable loaders are skipped."""
    photos = []
    for name in PHOTO_SOURCES:
        try:
            array = getattr(skimage.data, name)()
        except (AttributeError, ImportError, OSError, ValueError):  # absent, or would need a download
            continue
        if isinstance(array, tuple):
            array = array[0]
        photos.append((name, _as_rgb_image(array)))
    return photos


def _load_faces() -> np.ndarray:
    """The 200 Labeled-Faces-in-the-Wild crops of `skimage.data.lfw_subset()`: (200, 25, 25) in [0, 1]."""
    try:
        return skimage.data.lfw_subset()
    except (AttributeError, ImportError, OSError, ValueError):
        return np.zeros((0, 25, 25))


def _load_heldout_photos() -> list[tuple[str, Image.Image]]:
    """The available photographs of HELDOUT_PHOTOS as (name, RGB image)."""
    photos = []
    for name, where in HELDOUT_PHOTOS:
        package, item = where.split(":")
        try:
            if package == "skimage":
                photos.append((name, _as_rgb_image(getattr(skimage.data, item)())))
                continue
            spec = importlib.util.find_spec(package)  # the wheel's folder, without importing it
            folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
            if folder is None:
                continue
            with Image.open(os.path.join(folder, item)) as img:
                photos.append((name, img.convert("RGB")))
        except (AttributeError, ImportError, OSError, ValueError):  # absent, or would need a download
            continue
    return photos


def _encode(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _crops(photo: Image.Image, count: int, size: int, rng: random.Random) -> list[bytes]:
    """JPEG bytes of `count` random square crops of `photo` (log-uniform side), resized to size x size."""
    lo, hi = math.log(CROP_SIDE_RANGE[0]), math.log(CROP_SIDE_RANGE[1])
    short = min(photo.size)
    out = []
    for _ in range(count):
        side = max(8, int(round(short * math.exp(lo + (hi - lo) * rng.random()))))
        left = int(rng.random() * (photo.width - side + 1))
        top = int(rng.random() * (photo.height - side + 1))
        box = (left, top, left + side, top + side)
        out.append(_encode(photo.resize((size, size), Image.Resampling.BICUBIC, box=box)))
    return out


def _render(photos, faces, size: int, rng: random.Random) -> dict[str, list[tuple[str, bytes]]]:
    """{"train": [...], "val": [...]}: (source name, JPEG bytes) of every demo image, split by source.

    Drawn in a fixed order (photographs in PHOTO_SOURCES order, then the faces). train/ is shuffled
    with `rng`; val/ interleaves its photographs (crop 0 of each, crop 1 of each, ...) so that any
    prefix, e.g. the first eval.num_images files the evaluation reads, is balanced across them."""
    train, val = [], []
    for name, photo in photos:
        if name in VAL_PHOTOS:
            val.append([(name, jpeg) for jpeg in _crops(photo, VAL_CROPS_PER_PHOTO, size, rng)])
        else:
            train.extend((name, jpeg) for jpeg in _crops(photo, CROPS_PER_PHOTO, size, rng))
    for face in faces:  # (25, 25) grayscale in [0, 1], upscaled
        img = _as_rgb_image(face).resize((size, size), Image.Resampling.BICUBIC)
        train.append((FACES_SOURCE, _encode(img)))
    rng.shuffle(train)
    interleaved = [crops[k] for k in range(VAL_CROPS_PER_PHOTO) for crops in val]
    return {"train": train, "val": interleaved}


def _write_numbered(folder: str, jpegs: list[bytes]) -> None:
    """folder/00000.jpg, 00001.jpg, ...; numbered files left by an earlier, larger demo are removed."""
    os.makedirs(folder, exist_ok=True)
    keep = set()
    for k, jpeg in enumerate(jpegs):
        name = f"{k:05d}.jpg"
        keep.add(name)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(jpeg)
    for name in os.listdir(folder):
        if _FILE_NAME.match(name) and name not in keep:
            os.remove(os.path.join(folder, name))


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: str, manifest: dict | None, params: dict) -> bool:
    """True when `out_dir` holds every file of a demo written with `params` (a demo of an older
    format_version, e.g. 1 with its crop-level split, is not: it is rewritten)."""
    if not manifest or any(manifest.get(k) != v for k, v in params.items()):
        return False
    if not manifest.get("train_sources") or not manifest.get("val_sources"):
        return False
    for source in manifest.get("heldout_sources", []):
        folder = os.path.join(out_dir, HELDOUT_DIR, source)
        if not all(os.path.isfile(os.path.join(folder, f"{k:05d}.jpg")) for k in range(HELDOUT_CROPS_PER_PHOTO)):
            return False
    for split in ("train", "val"):
        folder = os.path.join(out_dir, split, "real")
        for k in range(int(manifest.get(split, -1))):
            if not os.path.isfile(os.path.join(folder, f"{k:05d}.jpg")):
                return False
    return manifest.get("train", 0) > 0 and manifest.get("val", 0) > 0


def _counts(manifest: dict) -> dict:
    return {"train": manifest["train"], "val": manifest["val"], "heldout": manifest.get("heldout", 0),
            "sources": len(manifest["train_sources"]) + len(manifest["val_sources"]),
            "heldout_sources": len(manifest.get("heldout_sources", []))}


def write_demo_dataset(out_dir: str | os.PathLike, *, size: int = 64, seed: int = 0) -> dict:
    """Write (or find already written) the demo dataset; return `{"train": n, "val": m, "sources": k}`.

    `sources` counts the photographs used plus one for the face set; demo.json lists them per split
    (`train_sources`, `val_sources`: disjoint, see the module docstring). Deterministic in
    (size, seed). A folder already holding a complete demo of this format with the same parameters
    is left untouched; any other demo there (other parameters, or an older format_version) is
    rewritten, which replaces only the numbered NNNNN.jpg files and demo.json.
    """
    if size < 8:
        raise DataError(f"demo size must be >= 8, got {size}")
    out_dir = os.fspath(out_dir)
    manifest_path = os.path.join(out_dir, _MANIFEST)
    params = {"format_version": _FORMAT_VERSION, "size": int(size), "seed": int(seed)}
    manifest = _read_manifest(manifest_path)
    if _is_complete(out_dir, manifest, params):
        return _counts(manifest)

    photos, faces = _load_photos(), _load_faces()
    if not any(name in VAL_PHOTOS for name, _ in photos):
        raise DataError(f"demo dataset: none of the held-out photographs {VAL_PHOTOS} is available offline "
                        f"in this scikit-image")
    if not any(name not in VAL_PHOTOS for name, _ in photos) and len(faces) == 0:
        raise DataError("demo dataset: no training photograph of scikit-image is available offline")
    rng = random.Random(seed)
    splits = _render(photos, faces, size, rng)  # {split: [(source, JPEG bytes)]}, disjoint sources
    heldout_rng = random.Random(f"unigendet demo heldout_real {seed}")  # str seeds hash stably (sha512)
    heldout = {name: _crops(photo, HELDOUT_CROPS_PER_PHOTO, size, heldout_rng)
               for name, photo in _load_heldout_photos()}

    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest is written
    for split, members in splits.items():
        _write_numbered(os.path.join(out_dir, split, "real"), [jpeg for _, jpeg in members])
    for source, crops in heldout.items():
        _write_numbered(os.path.join(out_dir, HELDOUT_DIR, source), crops)

    order = [name for name, _ in photos] + ([FACES_SOURCE] if len(faces) else [])
    used = {split: {source for source, _ in members} for split, members in splits.items()}
    manifest = dict(params, train_sources=[n for n in order if n in used["train"]],
                    val_sources=[n for n in order if n in used["val"]],
                    heldout_sources=list(heldout), train=len(splits["train"]), val=len(splits["val"]),
                    heldout=sum(len(c) for c in heldout.values()))
    tmp_path = manifest_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp_path, manifest_path)
    return _counts(manifest)
