"""Shared fixtures. Without a GPU, TRITON_INTERPRET=1 is set before any module defining @triton.jit
kernels is imported (unigendet imports kernels/ lazily), so the Triton kernels run on the CPU
interpreter; with a GPU they are compiled for it."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("UNIGENDET_BACKEND", None)  # tests choose backends explicitly

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The embedded demo dataset, written once per test session (train/ and val/)."""
    from unigendet.data import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=0)
    return root


@pytest.fixture
def tiny_overrides(demo_root, tmp_path):
    """Overrides that make `tiny_cpu` train in seconds: a very small model and few steps."""
    return [f"--data.root={demo_root / 'train'}", f"--eval.data={demo_root / 'val'}",
            f"--train.out_dir={tmp_path / 'run'}", "--model.width=32", "--model.depth=2", "--model.heads=2",
            "--model.kv_heads=1", "--model.align_layer=1", "--model.projector_hidden=32", "--train.batch_size=8",
            "--phases.pool_size=16", "--phases.refill_count=8", "--phases.sampler_steps=2",
            "--train.progress=false", "--data.num_workers=0", "--train.log_every=2", "--optim.warmup_steps=2"]


def _encoded(array, fmt: str, **kwargs) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bad_file_bytes() -> dict[str, tuple[bytes, str]]:
    """One file of each unreadable kind: {path relative to a data root: (bytes, expected reason)}."""
    import struct
    import zlib

    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg, png, webp = _encoded(noise, "JPEG"), _encoded(noise, "PNG"), _encoded(noise, "WEBP", lossless=True)
    garbled = bytearray(png)
    idat = garbled.index(b"IDAT")
    garbled[idat + 10 : idat + 40] = bytes(30)  # compressed pixels zeroed; signature, IHDR and IEND intact
    # A valid PNG header that declares 20000 x 20000 = 4e8 pixels (> 2 x PIL.Image.MAX_IMAGE_PIXELS) in 80 bytes.
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(bytes(64))) + _png_chunk(b"IEND", b""))
    svg = b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>\n'
    heic = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(200)  # HEIF file-type box
    return {
        "real/empty.jpg": (b"", "empty"),
        "real/cut.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "real/cut.png": (png[: len(png) // 2], "truncated"),
        "fake/cut.webp": (webp[: len(webp) // 2], "truncated"),
        "fake/random.png": (np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(), "not_an_image"),
        "real/notes.jpg": (b"shopping list: milk, eggs\n", "not_an_image"),
        "fake/vector.png": (svg, "unsupported_format"),
        "fake/phone.jpg": (heic, "unsupported_format"),
        "real/bomb.png": (bomb, "decompression_bomb"),
        "real/garbled.png": (bytes(garbled), "corrupt"),
    }


@pytest.fixture
def bad_root(tmp_path):
    """A data root with 8 good real and 4 good fake PNGs plus one file of each unreadable kind
    (`_bad_file_bytes`); returns (root path, {relative path: expected quarantine reason})."""
    import numpy as np

    root = tmp_path / "bad_root"
    for label, count in (("real", 8), ("fake", 4)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng(100 + i + 10 * (label == "fake"))
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            (root / label / f"good{i}.png").write_bytes(_encoded(pixels, "PNG"))
    expected = {}
    for rel, (data, reason) in _bad_file_bytes().items():
        (root / rel).write_bytes(data)
        expected[rel] = reason
    return root, expected


def _snapshot_files(folder) -> dict:
    """{relative path: (sha1 of bytes, mtime in ns)} of every file below `folder`."""
    import hashlib

    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha1(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture
def snapshot():
    """`snapshot(folder)` -> {relative path: (sha1, mtime_ns)}: proves that nothing on disk changed."""
    return _snapshot_files


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """The tiny random AutoencoderKL of tests/tiny_vae.py, saved once per session (needs diffusers)."""
    pytest.importorskip("diffusers")
    from tiny_vae import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="session")
def vae(vae_dir):
    """That VAE loaded through `load_vae`, the path a user's VAE takes."""
    from unigendet.vae import load_vae

    return load_vae(vae_dir)
