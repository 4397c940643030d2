"""Image files: finding them, decoding them into 8-bit RGB (errors name the file), crop/resize transforms.

Every image the engine reads goes through `decode_rgb` (`load_rgb` for a file), so all loaders agree
on how unusual files are interpreted:

- grayscale (`L`, `1`), `CMYK`, `YCbCr`, ... -> plain conversion to RGB;
- transparency (`RGBA`, `LA`, `PA`, `P` or `RGB`/`L` with a transparency key) -> composited over white,
  so pixels hidden under alpha = 0 (often garbage) never reach the model;
- 16-bit grayscale PNG (modes `I;16*`, `I`) -> scaled to 8 bit with `round(v / 257)`, so 65535 -> 255
  (Pillow's own `convert("L")` would clip everything above 255 to white);
- EXIF orientation is not applied: pixels are used as stored, as GPU decoders do.

Nothing global is changed (in particular `ImageFile.LOAD_TRUNCATED_IMAGES` is left alone): a truncated
or corrupt file raises `DataError`, and no file handle outlives the call.
"""
from __future__ import annotations

import io
import math
import os
import random
import stat
import struct

import numpy as np
import torch
from PIL import Image

from .batch import DataError

# Lower-case suffixes of the files that dataset scans pick up (matching is case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# Everything Pillow raises for unreadable, corrupt, truncated or oversized input.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_WHITE = (255, 255, 255)

DEFAULT_MAX_FILE_MB = 256  # data.max_file_mb: the largest file any reader reads


class UnreadableFile(DataError):
    """A file the readers refuse before decoding: `reason` is a quarantine reason (not_a_regular_file,
    too_large, corrupt for an I/O error), `detail` the one-line why."""

    def __init__(self, name: str, reason: str, detail: str):
        super().__init__(f"{name}: cannot read file ({detail})")
        self.reason, self.detail = reason, detail


def max_bytes(max_file_mb: int | float | None) -> int:
    """data.max_file_mb (None = the default) in bytes."""
    return int((DEFAULT_MAX_FILE_MB if max_file_mb is None else max_file_mb) * 2**20)


def open_regular(path: str, name: str | None = None) -> int:
    """A read-only descriptor of `path` when it is a regular file (a symlink to one is fine); else
    `UnreadableFile`. Opened non-blocking, so a FIFO never hangs the open; the type is checked on
    the open descriptor, so nothing can swap the file in between."""
    name = path if name is None else name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableFile(name, "corrupt", exc.strerror or str(exc)) from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "special")
        raise UnreadableFile(name, "not_a_regular_file", f"not a regular file: {kind}")
    os.set_blocking(fd, True)
    return fd


def read_file(path: str | os.PathLike, limit: int, name: str | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them (`UnreadableFile` otherwise)."""
    path = os.fspath(path)
    name = path if name is None else name
    fd = open_regular(path, name)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnreadableFile(name, "too_large", f"{size} bytes, more than data.max_file_mb = {limit // 2**20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # a file still growing stops at the limit too
    except OSError as exc:
        raise UnreadableFile(name, "corrupt", exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnreadableFile(name, "too_large", f"more than data.max_file_mb = {limit // 2**20} MiB")
    return data


def is_image_file(path: str) -> bool:
    """True when `path` has one of `IMAGE_EXTENSIONS` (any letter case)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str) -> list[str]:
    """Sorted image paths under `folder`, relative to it, recursive (follows links, never loops)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle: do not descend twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, folder)
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                found.append(os.path.normpath(os.path.join(rel_dir, name)))
    return sorted(found)


def load_rgb(path: str | os.PathLike, max_file_mb: int | None = None) -> Image.Image:
    """Decode the file `path` fully into a new `PIL.Image.Image` in mode RGB (see `decode_rgb`); only a
    regular file of at most `max_file_mb` MiB (None = `DEFAULT_MAX_FILE_MB`) is read."""
    path = os.fspath(path)
    return decode_rgb(read_file(path, max_bytes(max_file_mb)), path)


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Decode the encoded image `data` (a file's bytes; `name` says where they came from) into RGB.

    Raises `DataError("{name}: cannot decode image ({reason})")` for empty, truncated, corrupt or
    decompression-bomb data.
    """
    try:
        if not data:
            raise ValueError("empty file, 0 bytes")
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: truncation and corruption surface here, inside the try
            return _to_rgb(img)  # always a new image, independent of `data`
    except _DECODE_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DataError(f"{name}: cannot decode image ({reason})") from exc


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # markers without a length field


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header of the encoded image `data`, as Pillow reports it.

    JPEG (walks the marker segments to the start-of-frame) and PNG (IHDR) are read directly, about
    20x faster than `Image.open`; other formats, and anything unexpected, go through Pillow, whose
    errors propagate (the caller names the file).
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        pos, end = 2, len(data) - 9
        while pos < end:
            if data[pos] != 0xFF:
                break  # not at a marker: let Pillow judge the file
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
            elif marker in _JPEG_SOF:
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                if width and height:
                    return width, height
                break
            elif marker in _JPEG_STANDALONE:
                pos += 2
            else:
                pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to a new 8-bit RGB image (rules in the module docstring)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # (H, W) 16-bit samples; mode "I" (int32) is how some decoders hand out 16-bit PNG data.
        wide = np.asarray(img, dtype=np.int64).clip(0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257), exact integers
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        # 32-bit float samples (rare in the listed formats): read as the 0..255 scale Pillow uses.
        gray = np.asarray(img, dtype=np.float32).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # RGB (copy), L, 1, P, CMYK, YCbCr, LAB, HSV


# ---------------------------------------------------------------------------------------------------
# Transforms. A crop is a PIL box (left, top, right, bottom) in source pixels; `crop_resize` crops and
# resamples in one step (no intermediate image, one interpolation).

def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale_min: float, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """Inception-style random crop: area fraction ~ U[scale_min, 1], aspect ratio log-uniform in `ratio`.

    Ten tries for a box that fits; then a center crop with the aspect ratio clamped into `ratio`.
    Only `rng.random()` is used, whose sequence Python guarantees across versions.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * (scale_min + (1.0 - scale_min) * rng.random())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(rng.random() * (width - w + 1)), width - w)
            top = min(int(rng.random() * (height - h + 1)), height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centered square of side min(width, height): "resize the shorter side, center crop"."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


# data.crop: "random_resized" (`random_resized_crop_box`) or "center" (`center_square_box`, the one
# crop precomputed latents allow: `data pack --vae` encodes exactly that crop).
CROP_MODES = ("random_resized", "center")


def crop_plan(
    width: int, height: int, rng: random.Random | None, *, crop: str = "random_resized",
    crop_scale_min: float = 0.6, flip: bool = True,
) -> tuple[tuple[float, float, float, float], bool]:
    """(crop box, flip?) of a width x height image. With `rng` (training): the `crop` box, then a
    horizontal flip with probability 1/2 when `flip` (drawn after the box, so both loaders, which call
    this, consume the same stream). Without (evaluation): the center square, no flip."""
    if rng is None:
        return center_square_box(width, height), False
    if crop == "random_resized":
        box = random_resized_crop_box(width, height, rng, crop_scale_min)
    elif crop == "center":
        box = center_square_box(width, height)
    else:
        raise DataError(f"data.crop = {crop!r}: expected one of {', '.join(map(repr, CROP_MODES))}")
    return box, flip and rng.random() < 0.5


def crop_resize(
    img: Image.Image, size: int, rng: random.Random | None, *, crop: str = "random_resized",
    crop_scale_min: float = 0.6, flip: bool = True,
) -> torch.Tensor:
    """RGB image -> (3, size, size) float32 in [-1, 1]; one bicubic (antialiased) resample of the crop
    and flip `crop_plan` draws (evaluation, rng=None: shorter side to `size`, center crop, no flip)."""
    box, flip = crop_plan(img.width, img.height, rng, crop=crop, crop_scale_min=crop_scale_min, flip=flip)
    return resize_box(img, size, box, flip)


def resize_box(img: Image.Image, size: int, box: tuple[float, float, float, float], flip: bool) -> torch.Tensor:
    """The `box` of `img` resampled (bicubic, antialiased) to (3, size, size) float32 in [-1, 1], mirrored
    left-right when `flip`."""
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float32 in [-1, 1] (0 -> -1.0 and 255 -> +1.0 exactly)."""
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3), writable copy
    return hwc.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)
