"""The embedded demo dataset: multi-scale crops of the real photographs shipped in scikit-image.

`write_demo_dataset` needs no network: every source below is read from files inside the
scikit-image wheel (loaders that need `pooch` downloads are not used). Output:

    out_dir/train/real/00000.jpg ...   JPEG (quality 92), size x size
    out_dir/val/real/00000.jpg ...
    out_dir/demo.json                  parameters, sources and counts; written last = complete

The same (size, seed, val_fraction) gives the same bytes (with the same Pillow build): crops are drawn
from `random.Random(seed)`, whose `random()` sequence Python keeps stable across versions.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import re

import numpy as np
from PIL import Image

from .batch import DataError

# skimage.data loaders that read real photographs from the wheel itself (checked offline, 0.26).
# `cat` is `chelsea` again, `stereo_motorcycle` returns (left, right, disparity): the left view is used.
PHOTO_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "brick", "grass", "gravel",
    "hubble_deep_field", "retina", "immunohistochemistry", "stereo_motorcycle",
)
CROPS_PER_PHOTO = 70
CROP_SIDE_RANGE = (0.15, 0.70)  # crop side as a fraction of the photo's shorter side (log-uniform)
JPEG_QUALITY = 92
_FORMAT_VERSION = 1
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
    import skimage.data  # deferred: only the demo needs scikit-image

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
    import skimage.data

    try:
        return skimage.data.lfw_subset()
    except (AttributeError, ImportError, OSError, ValueError):
        return np.zeros((0, 25, 25))


def _encode(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _render(photos, faces, size: int, rng: random.Random) -> list[bytes]:
    """JPEG bytes of every demo image, in a fixed order: photo crops, then faces."""
    images = []
    lo, hi = math.log(CROP_SIDE_RANGE[0]), math.log(CROP_SIDE_RANGE[1])
    for _, photo in photos:
        short = min(photo.size)
        for _ in range(CROPS_PER_PHOTO):
            side = max(8, int(round(short * math.exp(lo + (hi - lo) * rng.random()))))
            left = int(rng.random() * (photo.width - side + 1))
            top = int(rng.random() * (photo.height - side + 1))
            box = (left, top, left + side, top + side)
            images.append(_encode(photo.resize((size, size), Image.Resampling.BICUBIC, box=box)))
    for face in faces:  # (25, 25) grayscale in [0, 1], upscaled
        img = _as_rgb_image(face).resize((size, size), Image.Resampling.BICUBIC)
        images.append(_encode(img))
    return images


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: str, manifest: dict | None, params: dict) -> bool:
    """True when `out_dir` holds every file of a demo written with `params`."""
    if not manifest or any(manifest.get(k) != v for k, v in params.items()):
        return False
    for split in ("train", "val"):
        folder = os.path.join(out_dir, split, "real")
        for k in range(int(manifest.get(split, -1))):
            if not os.path.isfile(os.path.join(folder, f"{k:05d}.jpg")):
                return False
    return manifest.get("train", 0) > 0


def write_demo_dataset(
    out_dir: str | os.PathLike, *, size: int = 64, seed: int = 0, val_fraction: float = 0.15
) -> dict:
    """Write (or find already written) the demo dataset; return `{"train": n, "val": m, "sources": k}`.

    `sources` counts the photographs used plus one for the face set. Deterministic in
    (size, seed, val_fraction). A folder already holding a complete demo with the same parameters
    is left untouched. Rewriting replaces only the numbered NNNNN.jpg files and demo.json.
    """
    if size < 8:
        raise DataError(f"demo size must be >= 8, got {size}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"demo val_fraction must be in (0, 1), got {val_fraction}")
    out_dir = os.fspath(out_dir)
    manifest_path = os.path.join(out_dir, _MANIFEST)
    params = {
        "format_version": _FORMAT_VERSION, "size": int(size), "seed": int(seed), "val_fraction": float(val_fraction)
    }
    manifest = _read_manifest(manifest_path)
    if _is_complete(out_dir, manifest, params):
        return {"train": manifest["train"], "val": manifest["val"], "sources": len(manifest["sources"])}

    photos, faces = _load_photos(), _load_faces()
    if not photos and len(faces) == 0:
        raise DataError("demo dataset: no scikit-image sample photographs are available offline")
    rng = random.Random(seed)
    images = _render(photos, faces, size, rng)  # list of JPEG bytes, fixed order

    # Seeded split: a crop lands in exactly one split (a photograph may feed both).
    order = list(range(len(images)))
    rng.shuffle(order)
    n_val = max(1, int(round(val_fraction * len(images))))
    splits = {"val": order[:n_val], "train": order[n_val:]}

    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest is written
    for split, members in splits.items():
        folder = os.path.join(out_dir, split, "real")
        os.makedirs(folder, exist_ok=True)
        keep = set()
        for k, item in enumerate(members):
            name = f"{k:05d}.jpg"
            keep.add(name)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(images[item])
        for name in os.listdir(folder):  # numbered files left by an earlier, larger demo
            if _FILE_NAME.match(name) and name not in keep:
                os.remove(os.path.join(folder, name))

    sources = [name for name, _ in photos] + (["lfw_subset"] if len(faces) else [])
    manifest = dict(params, sources=sources, train=len(splits["train"]), val=len(splits["val"]))
    tmp_path = manifest_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp_path, manifest_path)
    return {"train": manifest["train"], "val": manifest["val"], "sources": len(sources)}
