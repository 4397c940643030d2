"""`unigendet data check ROOT`: decode every image of a data root and list the unreadable ones.

Every image `scan_data(ROOT, quarantine=None)` finds (the loaders' file set, an existing list
ignored, so a re-check starts afresh; ROOT is an image folder or webdataset shards) is decoded with
`decode_rgb`, the decoder of the loaders, so an image passes the check exactly when the loaders can
read it. Files are only opened for reading: the check never deletes, moves or modifies them.

A failure gets the first reason that applies (engine/data/quarantine.py REASONS):

0. `not_a_regular_file` / `too_large`: refused before reading (a FIFO, a device or a symlink to one;
   more than data.max_file_mb, `--max-file-mb`): only regular files are read, and only so much.
1. `empty`: the file has 0 bytes.
2. `decompression_bomb`: Pillow's `DecompressionBombError`, raised when the header declares more than
   2 x `PIL.Image.MAX_IMAGE_PIXELS` pixels. The loaders get it from the same `decode_rgb` and the same
   module global, so the limit of the check and of the loaders is one and the same.
3. Pillow cannot identify the file (`UnidentifiedImageError`): `not_an_image` and `unsupported_format`
   raise the same error, so they are told apart by the file's first bytes. No known image signature
   (random bytes, text, HTML, PDF, ...) -> `not_an_image`; the signature of an image format this
   Pillow build cannot decode (SVG, HEIF/HEIC, JPEG XL; AVIF, WebP, JPEG 2000 when built without
   them) -> `unsupported_format`; the signature of a format Pillow decodes -> a damaged file (4, 6).
4. `truncated`: Pillow says so ("image file is truncated", "Truncated File Read"), or a JPEG lacks its
   end marker FF D9, a PNG its IEND chunk, a WebP holds fewer bytes than its RIFF header declares.
5. `unsupported_format`: Pillow knows the format but not this variant or has no codec for it
   ("Unsupported BMP compression", "decoder ... not available", ...).
6. `corrupt`: anything else (bad data inside the stream, a file that cannot be read: see the detail).

Decoding runs in a thread pool: Pillow releases the GIL while it decodes and converts, threads share
the pixel limit above, and results are collected in file order, so the output does not depend on the
number of workers.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError, features

from .batch import DataError
from .images import UnreadableFile, decode_rgb
from .index import FolderIndex
from .quarantine import REASONS, BadFile
from .sources import scan_data

_SNIFF_BYTES = 512  # enough for the signatures below, an SVG's XML prolog included
_TAIL_BYTES = 64  # where the JPEG / PNG end markers must be
_CHUNK = 1024  # files per pool.map call: bounded memory on million-file folders, progress per chunk

_TRUNCATED = re.compile(r"truncated", re.IGNORECASE)
_UNSUPPORTED = re.compile(
    r"unsupported|not supported|not available|not installed|no decoder|cannot find loader|ghostscript", re.IGNORECASE
)
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


@dataclass
class CheckResult:
    """What `check_index` found: how many files it decoded and the unreadable ones (sorted by path)."""

    root: str
    checked: int
    bad: list[BadFile]

    def counts(self) -> dict[str, int]:
        """{reason: number of files} for every reason in `REASONS` order (zeros included)."""
        found = Counter(entry.reason for entry in self.bad)
        return {reason: found[reason] for reason in REASONS}


def default_workers() -> int:
    """`--workers` default: min(4, CPU count)."""
    return max(1, min(4, os.cpu_count() or 1))


def check_folder(root: str | os.PathLike, workers: int | None = None) -> CheckResult:
    """Decode every image of the data root `root` (quarantine lists ignored); see the module docstring."""
    return check_index(scan_data(root, quarantine=None), workers)


def check_index(
    index: FolderIndex, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> CheckResult:
    """Decode every image of `index` with `workers` threads; `progress(done, total)` after each chunk."""
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    Image.init()  # register every plugin now, in this thread, not racing inside the pool
    prefix = os.path.join(index.root, "")  # index names are root joined with the relative name
    bad: list[BadFile] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(index), _CHUNK):
            chunk = range(start, min(start + _CHUNK, len(index)))
            for i, failure in zip(chunk, pool.map(lambda i: check_sample(index, i), chunk)):  # in order
                if failure is not None:
                    rel = index.files[i][len(prefix):].replace(os.sep, "/")
                    bad.append(BadFile(rel, *failure))
            if progress is not None:
                progress(chunk.stop, len(index))
    bad.sort(key=lambda entry: entry.path)
    return CheckResult(root=index.root, checked=len(index), bad=bad)


def check_sample(index: FolderIndex, i: int) -> tuple[str, str] | None:
    """(reason, detail) when the loaders cannot decode image i of `index`, None when they can."""
    try:
        data = index.read_bytes(i)
    except UnreadableFile as exc:
        return exc.reason, exc.detail if exc.reason != "corrupt" else f"cannot read the file ({exc.detail})"
    except DataError as exc:
        cause = exc.__cause__
        return "corrupt", f"cannot read the file ({getattr(cause, 'strerror', None) or cause or exc})"
    try:
        decode_rgb(data, index.files[i])
        return None
    except DataError as exc:
        cause = exc.__cause__ or exc
    except Exception as exc:  # an error decode_rgb does not expect: the loaders would fail on it too
        cause = exc
    return classify_failure(data, cause)


def classify_failure(data: bytes, exc: BaseException) -> tuple[str, str]:
    """(reason, one-line detail) for encoded `data` whose decoding raised `exc` (rules in the module docstring)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    size, head, tail = len(data), data[:_SNIFF_BYTES], data[-_TAIL_BYTES:]
    if size == 0:
        return "empty", "0 bytes"
    if isinstance(exc, Image.DecompressionBombError):
        return "decompression_bomb", message
    fmt = sniff_format(head)
    if isinstance(exc, UnidentifiedImageError):
        if fmt is None:
            first = head[:8].hex(" ")
            return "not_an_image", f"no image signature in the first bytes ({first}); Pillow cannot identify it"
        if fmt not in _decodable_formats():
            return "unsupported_format", f"{fmt} image: this Pillow build has no decoder for it"
        message = f"{fmt} signature, but Pillow cannot read the header"
    if _TRUNCATED.search(message) or _cut_short(fmt, size, head, tail):
        return "truncated", message if _TRUNCATED.search(message) else f"{fmt} file ends early ({message})"
    if _UNSUPPORTED.search(message):
        return "unsupported_format", message
    return "corrupt", message


def sniff_format(head: bytes) -> str | None:
    """Name of the image format whose signature starts `head` (the file's first bytes), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 26:  # BITMAPFILEHEADER + the start of the info header
        return "BMP"
    if head[4:8] == b"ftyp":  # ISO base media file: the brand says which image format
        if head[8:12] in _AVIF_BRANDS:
            return "AVIF"
        if head[8:12] in _HEIF_BRANDS:
            return "HEIF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):  # codestream, container
        return "JPEG XL"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):  # JP2, raw codestream
        return "JPEG2000"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()  # UTF-8 BOM and whitespace before the XML
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


def _decodable_formats() -> set[str]:
    """Formats of `sniff_format` that this Pillow build decodes (the codec libraries are optional)."""
    formats = {"JPEG", "PNG", "GIF", "TIFF", "BMP"}
    for name, feature in (("WEBP", "webp"), ("AVIF", "avif"), ("JPEG2000", "jpg_2000")):
        if features.check(feature):
            formats.add(name)
    return formats


def _cut_short(fmt: str | None, size: int, head: bytes, tail: bytes) -> bool:
    """True when a file that failed to decode is missing its format's end (so it was cut, not garbled)."""
    if fmt == "JPEG":
        return not tail.rstrip(b"\x00").endswith(b"\xff\xd9")  # EOI; some writers pad with zeros
    if fmt == "PNG":
        return b"IEND" not in tail
    if fmt == "WEBP":
        return int.from_bytes(head[4:8], "little") + 8 > size  # RIFF size counts the bytes after it
    return False
