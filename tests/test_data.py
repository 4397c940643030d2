"""Tests for unigendet.data: Batch contract, decoding, folder scanning, loader determinism, demo data."""
from __future__ import annotations

import io
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.data import (
    IMAGE_EXTENSIONS,
    QUARANTINE_NAME,
    REASONS,
    BadFile,
    Batch,
    DataError,
    FolderDataset,
    FolderLoader,
    build_loader,
    check_folder,
    default_quarantine_path,
    load_eval_images,
    load_rgb,
    read_quarantine,
    scan_folder,
    write_demo_dataset,
)
from unigendet import load_config
from unigendet.data import demo
from unigendet.data.demo import PHOTO_KINDS, PHOTO_SOURCES, VAL_PHOTOS
from unigendet.data.images import image_size, is_image_file
from unigendet.data.quarantine import write_quarantine

S = 16  # image size of the loader tests


def _write_noise(path, width, height, seed, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)


def _make_root(root, n_real=11, n_fake=0, classes=()):
    """Noise images of varied sizes under root/real (per class if `classes`) and root/fake."""
    k = 0
    for label, count in (("real", n_real), ("fake", n_fake)):
        for i in range(count):
            sub = os.path.join(label, classes[i % len(classes)]) if classes else label
            _write_noise(os.path.join(root, sub, f"{i:03d}.png"), 20 + 3 * (k % 7), 18 + 5 * (k % 5), seed=k)
            k += 1
    return str(root)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
        assert torch.equal(x.is_fake, y.is_fake) and torch.equal(x.class_ids, y.class_ids)


# ---------------------------------------------------------------------------------------------- Batch

def _batch(b=3):
    return Batch(torch.rand(b, 3, 8, 8) * 2 - 1, torch.tensor([0.0, 1.0, 0.0][:b]), torch.full((b,), -1))


def test_batch_contract():
    batch = _batch()
    batch.validate()
    assert len(batch) == 3
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda b: setattr(b, "images", b.images[0]), "images"),  # wrong ndim
        (lambda b: setattr(b, "images", b.images.double()), "images"),  # wrong dtype
        (lambda b: setattr(b, "images", b.images * 3), "images"),  # out of range
        (lambda b: setattr(b, "images", b.images[:, :1]), "images"),  # not 3 channels
        (lambda b: setattr(b, "is_fake", b.is_fake[:2]), "is_fake"),  # B mismatch
        (lambda b: setattr(b, "is_fake", b.is_fake.long()), "is_fake"),
        (lambda b: setattr(b, "class_ids", b.class_ids.int()), "class_ids"),
        (lambda b: setattr(b, "class_ids", b.class_ids - 5), "class_ids"),
    ],
)
def test_batch_validate_names_field(change, field):
    batch = _batch()
    change(batch)
    with pytest.raises(DataError, match=f"Batch.{field}"):
        batch.validate()


# ------------------------------------------------------------------------------------ scan / labels

def test_labels_from_real_and_fake(tmp_path):
    root = _make_root(tmp_path, n_real=5, n_fake=3)
    index = scan_folder(root)
    assert len(index) == 8 and index.classes == []
    assert index.is_fake == [0] * 5 + [1] * 3 and index.class_ids == [-1] * 8
    for path, fake in zip(index.files, index.is_fake):
        assert os.path.basename(os.path.dirname(path)) == ("fake" if fake else "real")
    assert index.files[:5] == sorted(index.files[:5])


def test_class_subfolders(tmp_path):
    root = _make_root(tmp_path, n_real=6, n_fake=4, classes=("dog", "cat"))
    _write_noise(os.path.join(root, "fake", "stray.png"), 20, 20, seed=99)  # fake without a class
    index = scan_folder(root)
    assert index.classes == ["cat", "dog"]
    for path, fake, cid in zip(index.files, index.is_fake, index.class_ids):
        parent = os.path.basename(os.path.dirname(path))
        assert cid == ({"cat": 0, "dog": 1}[parent] if parent in ("cat", "dog") else -1)
        assert fake == (os.sep + "fake" + os.sep in path)
    batch = next(iter(FolderLoader(index, S, 4, num_workers=0)))
    assert set(batch.class_ids.tolist()) <= {-1, 0, 1}


def test_class_folder_errors(tmp_path):
    root = _make_root(tmp_path / "a", n_real=4, classes=("cat", "dog"))
    _write_noise(os.path.join(root, "fake", "horse", "0.png"), 20, 20, seed=1)
    with pytest.raises(DataError, match=r"fake.horse"):
        scan_folder(root)
    root = _make_root(tmp_path / "b", n_real=4, classes=("cat",))
    _write_noise(os.path.join(root, "real", "loose.png"), 20, 20, seed=1)
    with pytest.raises(DataError, match="loose.png"):
        scan_folder(root)


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "fake").mkdir()
    with pytest.raises(DataError, match=r"real.*missing"):
        scan_folder(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"real.*no images"):
        scan_folder(tmp_path)


def test_extensions_case_insensitive(tmp_path):
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp"} <= set(IMAGE_EXTENSIONS)
    for i, ext in enumerate(("JPG", "Jpeg", "PNG", "bmp", "WebP")):
        fmt = {"JPG": "JPEG", "Jpeg": "JPEG", "bmp": "BMP", "WebP": "WEBP"}.get(ext, "PNG")
        _write_noise(str(tmp_path / "real" / f"{i}.{ext}"), 20, 20, seed=i, fmt=fmt)
    (tmp_path / "real" / ".hidden.png").write_bytes(b"")  # ignored
    assert len(scan_folder(tmp_path)) == 5


# ------------------------------------------------------------------------------------------- loader

def test_batches_shapes_range_dtype(tmp_path):
    root = _make_root(tmp_path, n_real=7, n_fake=5)
    loader = build_loader(root, S, 5, num_workers=0)
    assert loader.batches_per_epoch == 2 and loader.num_classes == 0
    for batch in _take(loader, 5):  # crosses epoch boundaries: the batch size never changes
        batch.validate()
        assert batch.images.shape == (5, 3, S, S) and batch.images.dtype == torch.float32
        assert batch.is_fake.dtype == torch.float32 and batch.class_ids.dtype == torch.int64
        assert batch.images.min() >= -1 and batch.images.max() <= 1
    labels = torch.cat([b.is_fake for b in _take(build_loader(root, S, 4, num_workers=0, seed=3), 12)])
    assert set(labels.tolist()) == {0.0, 1.0}


def test_too_few_images(tmp_path):
    root = _make_root(tmp_path, n_real=3)
    with pytest.raises(DataError, match=r"3 images.*batch size 4"):
        build_loader(root, S, 4)


def test_unknown_loader_is_refused_and_missing_dali_is_reported(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="expected 'auto'"):
        build_loader(_make_root(tmp_path), S, 2, loader="opencv")
    import unigendet.data.loaders.dali as dali

    monkeypatch.setattr(dali, "dali_reason", lambda: "nvidia-dali is not usable here (ImportError: test)")
    with pytest.raises(DataError, match="data.loader = 'dali': nvidia-dali is not usable here"):
        build_loader(_make_root(tmp_path), S, 2, loader="dali")
    assert not isinstance(build_loader(_make_root(tmp_path), S, 2, loader="auto", device="cuda"), dali.DaliLoader)


def test_same_seed_same_batches_any_worker_count(tmp_path):
    root = _make_root(tmp_path, n_real=9, n_fake=4)
    state = torch.get_rng_state()
    ref = _take(build_loader(root, S, 4, seed=7, num_workers=0), 7)
    _assert_same_batches(ref, _take(build_loader(root, S, 4, seed=7, num_workers=2), 7))
    assert torch.equal(state, torch.get_rng_state())  # loading never touches the global RNG
    other = _take(build_loader(root, S, 4, seed=8, num_workers=0), 1)[0]
    assert not torch.equal(other.images, ref[0].images)


def test_decoded_cache_reads_each_file_once_and_changes_no_batch(tmp_path):
    """data.cache_mb: the same batches as without a cache, every file read once over three epochs;
    past the budget images are read every time."""
    root = _make_root(tmp_path, n_real=9, n_fake=3)
    plain = _take(build_loader(root, S, 4, seed=3, num_workers=0, cache_mb=0), 9)  # 3 epochs of 3 batches
    cached = build_loader(root, S, 4, seed=3, num_workers=0, cache_mb=1)
    reads = []
    reader = cached.index.reader
    cached.index.reader = lambda index, i: reads.append(i) or reader(index, i)
    _assert_same_batches(plain, _take(cached, 9))
    assert sorted(reads) == list(range(12))
    small = FolderDataset(scan_folder(root), S, seed=3, cache_bytes=(20 * 18 + 23 * 23) * 3)  # images 0 and 1
    for _ in range(2):
        for i in range(len(small)):
            small[i]
    assert sorted(small._decoded) == [0, 1] and small._decoded_bytes == small.cache_bytes


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    index = scan_folder(_make_root(tmp_path, n_real=3))
    data = FolderDataset(index, S, seed=1)
    first = data[2][0]
    torch.testing.assert_close(FolderDataset(index, S, seed=1)[2][0], first, rtol=0, atol=0)
    data.set_epoch(1)
    assert not torch.equal(data[2][0], first)
    evaluation = FolderDataset(index, S, seed=1, train=False)
    before = evaluation[2][0]
    evaluation.set_epoch(5)  # no randomness in evaluation
    torch.testing.assert_close(evaluation[2][0], before, rtol=0, atol=0)


@pytest.mark.parametrize("n", [13, 12])
def test_sharding_disjoint_equal(tmp_path, n):
    index = scan_folder(_make_root(tmp_path, n_real=n))
    ranks = [FolderLoader(index, S, 3, seed=5, rank=r, world_size=2, num_workers=0) for r in range(2)]
    for epoch in (0, 1):
        seen = [sum(loader.epoch_batches(epoch), []) for loader in ranks]
        assert len(seen[0]) == len(seen[1]) == 6
        assert not set(seen[0]) & set(seen[1])
    # What a rank yields is exactly its share: the first batch equals the items its sampler names.
    batch = _take(ranks[1], 1)[0]
    items = [ranks[1].dataset[i] for i in ranks[1].epoch_batches(0)[0]]
    torch.testing.assert_close(batch.images, torch.stack([x[0] for x in items]), rtol=0, atol=0)


def test_resume_continues_with_the_same_batches(tmp_path):
    root = _make_root(tmp_path, n_real=10)
    straight = _take(build_loader(root, S, 4, seed=2, num_workers=0), 7)  # 2 batches per epoch
    first = build_loader(root, S, 4, seed=2, num_workers=0)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 1}
    resumed = build_loader(root, S, 4, seed=2, num_workers=2)
    resumed.load_state_dict(state)
    _assert_same_batches(head + _take(resumed, 4), straight)
    with pytest.raises(DataError, match="position"):
        resumed.load_state_dict({"epoch": 0, "position": 9})


# ------------------------------------------------------------------------------------- bad files

def _corrupt_bytes():
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(good, format="JPEG")
    return {
        "empty.jpg": b"",
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
        "random.png": np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }


@pytest.mark.parametrize("name", ["empty.jpg", "truncated.jpg", "random.png"])
def test_corrupt_file_raises_naming_it(tmp_path, name, snapshot):
    root = _make_root(tmp_path, n_real=4)
    bad = tmp_path / "real" / name
    bad.write_bytes(_corrupt_bytes()[name])
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=f"{name}: cannot decode image"):
        load_rgb(bad)
    for workers in (0, 2):
        # One line (a worker's traceback is stripped), naming the file and the command that lists it.
        one_line = rf"^bad file in dataset folder.*{name}.*`unigendet data check {re.escape(root)}`[^\n]*$"
        with pytest.raises(DataError, match=one_line):
            _take(build_loader(root, S, 5, num_workers=workers), 1)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------ data check and quarantine

def test_check_gives_each_bad_file_its_reason(bad_root, snapshot):
    root, expected = bad_root
    before = snapshot(root)
    result = check_folder(root, workers=2)
    assert result.checked == 12 + len(expected)
    assert {b.path: b.reason for b in result.bad} == expected
    assert [b.path for b in result.bad] == sorted(expected)  # sorted, relative to the root, "/" separators
    assert all(b.detail and "\n" not in b.detail and str(root) not in b.detail for b in result.bad)
    assert result.counts() == {r: sum(v == r for v in expected.values()) for r in REASONS}
    # every reason of a decoded file is exercised (special and oversized files: tests/test_hostile_files.py)
    assert set(expected.values()) == set(REASONS) - {"not_a_regular_file", "too_large"}
    assert check_folder(root, workers=1).bad == result.bad  # deterministic whatever the worker count
    assert snapshot(root) == before  # nothing read was changed, nothing was written


def test_loader_skips_quarantined_files(bad_root, snapshot):
    root, expected = bad_root
    write_quarantine(default_quarantine_path(root), check_folder(root).bad)
    before = snapshot(root)
    listed = {os.path.join(str(root), rel) for rel in expected}
    for workers in (0, 2):
        loader = build_loader(root, S, 4, seed=1, num_workers=workers)
        assert len(loader.index) == 12 and not listed & set(loader.index.files)
        assert sorted(loader.index.skipped) == sorted(listed)
        assert loader.index.quarantine == default_quarantine_path(root)
        assert QUARANTINE_NAME not in " ".join(loader.index.files)  # the list itself is not an image
        for batch in _take(loader, 7):  # 3 batches per epoch: crosses two epochs, every good file loaded
            batch.validate()
    images, is_fake = load_eval_images(root, S, num_workers=2)
    assert images.shape == (12, 3, S, S) and is_fake.sum() == 4
    assert snapshot(root) == before


def test_loader_without_list_names_the_file_and_the_command(bad_root):
    root, expected = bad_root
    command = f"`unigendet data check {shlex.quote(str(root))}`"
    for workers in (0, 2):
        loader = build_loader(root, S, 12 + len(expected), num_workers=workers)  # one batch holds every file
        with pytest.raises(DataError) as info:
            _take(loader, 1)
        message = str(info.value)
        assert message.startswith(f"bad file in dataset folder {root}: ") and "\n" not in message
        assert command in message
        assert any(os.path.join(str(root), rel) + ": cannot decode image" in message for rel in expected)
    with pytest.raises(DataError, match=re.escape(command)):
        load_eval_images(root, S, num_workers=2)
    # An existing list is ignored on request (the check itself reads every file).
    write_quarantine(default_quarantine_path(root), check_folder(root).bad)
    assert len(scan_folder(root, quarantine=None)) == 12 + len(expected) and len(scan_folder(root)) == 12


def test_quarantine_list_at_another_path(bad_root, tmp_path):
    root, _ = bad_root
    elsewhere = tmp_path / "lists" / "bad.tsv"
    elsewhere.parent.mkdir()
    write_quarantine(elsewhere, check_folder(root).bad)
    assert not os.path.exists(default_quarantine_path(root))
    index = scan_folder(root, quarantine=elsewhere)
    assert len(index) == 12 and index.quarantine == str(elsewhere)
    assert len(build_loader(root, S, 4, num_workers=0, quarantine=str(elsewhere)).index) == 12
    assert load_eval_images(root, S, quarantine=str(elsewhere))[0].shape[0] == 12
    with pytest.raises(DataError, match=r"missing.tsv: quarantine list not found"):
        scan_folder(root, quarantine=tmp_path / "missing.tsv")


def test_quarantine_keeps_class_ids(tmp_path):
    root = _make_root(tmp_path, n_real=6, n_fake=2, classes=("cat", "dog"))
    dogs = sorted(os.listdir(tmp_path / "real" / "dog"))
    write_quarantine(default_quarantine_path(root), [BadFile(f"real/dog/{f}", "corrupt", "x") for f in dogs])
    index = scan_folder(root)
    assert index.classes == ["cat", "dog"]  # decided before the list is applied: ids never shift
    assert all("dog" not in path or "fake" in path for path in index.files)
    assert index.class_ids[: index.num_real] == [0] * index.num_real
    every_real = [f"real/{c}/{f}" for c in ("cat", "dog") for f in os.listdir(tmp_path / "real" / c)]
    write_quarantine(default_quarantine_path(root), [BadFile(p, "corrupt", "x") for p in every_real])
    with pytest.raises(DataError, match="all 6 real images are listed in the quarantine list"):
        scan_folder(root)


def test_quarantine_list_format(tmp_path):
    odd = [BadFile("real/tab\there.jpg", "empty", "0 bytes"), BadFile("real/back\\slash\nnew.png", "corrupt", "a\tb"),
           BadFile("fake/ünï cödé.webp", "truncated", "cut")]
    path = tmp_path / "q.tsv"
    write_quarantine(path, odd)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\treason\tdetail" and len(lines) == 4
    assert all(line.count("\t") == 2 for line in lines)
    assert read_quarantine(path) == sorted(odd, key=lambda b: b.path)
    assert not is_image_file(QUARANTINE_NAME) and QUARANTINE_NAME.startswith(".")
    for text, match in [("path\treason\n", "not a quarantine list"), ("", "not a quarantine list"),
                        ("path\treason\tdetail\nreal/a.jpg\tbroken\tx\n", r"q.tsv:2: unknown reason 'broken'"),
                        ("path\treason\tdetail\nreal/a.jpg\tempty\n", r"q.tsv:2: expected 3 tab-separated"),
                        ("path\treason\tdetail\n/abs/a.jpg\tempty\tx\n", r"q.tsv:2: path must be relative")]:
        path.write_text(text)
        with pytest.raises(DataError, match=match):
            read_quarantine(path)


def test_pixel_limit_is_shared_by_check_and_loader(tmp_path, monkeypatch):
    root = _make_root(tmp_path, n_real=4)  # images of at most 38 x 38 pixels
    _write_noise(str(tmp_path / "real" / "big.png"), 60, 50, seed=5)  # 3000 pixels
    assert check_folder(root).bad == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses more than 2 x 1000 pixels
    assert [(b.path, b.reason) for b in check_folder(root, workers=2).bad] == [("real/big.png", "decompression_bomb")]
    with pytest.raises(DataError, match=r"big.png: cannot decode image \(Image size \(3000 pixels\)"):
        load_rgb(tmp_path / "real" / "big.png")
    with pytest.raises(DataError, match=r"bad file in dataset folder.*big.png"):
        _take(build_loader(root, S, 5, num_workers=0), 1)


# --------------------------------------------------------------------------------- unusual images

def _tensor_of(path, train=True, size=S):
    root = os.path.dirname(os.path.dirname(path))
    index = scan_folder(root)
    image, _, _ = FolderDataset(index, size, seed=0, train=train)[index.files.index(str(path))]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    return image


def write_unusual_images(real) -> int:
    """13 valid but unusual images (modes, bit depths, alpha, tiny) in folder `real`; returns the count."""
    real.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 40), 200, np.uint8)).save(real / "gray.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(real / "cmyk.jpg", quality=95)  # pure red
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white after compositing
    Image.fromarray(rgba).save(real / "rgba.png")
    Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(real / "white16.png")
    Image.fromarray(np.full((30, 30), 32896, np.uint16)).save(real / "mid16.png")  # 128 * 257
    Image.fromarray(np.full((7, 5, 3), 10, np.uint8)).save(real / "tiny.png")  # smaller than S
    palette = Image.fromarray(np.ones((30, 30), np.uint8), mode="P")  # every pixel is palette entry 1
    palette.putpalette([255, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(real / "palette.png")
    palette.putdata([0] * 900)  # entry 0 (red) declared transparent -> white
    palette.save(real / "palette_tr.png", transparency=0)
    Image.fromarray(np.dstack([np.full((30, 30), 50, np.uint8), np.full((30, 30), 255, np.uint8)]), mode="LA").save(
        real / "la.png")
    Image.new("1", (30, 30), 1).save(real / "bilevel.png")
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(real / "gray.jpg", quality=95)
    Image.new("RGB", (40, 30), (30, 60, 90)).save(real / "progressive.jpg", quality=95, progressive=True)
    Image.fromarray(rgba).save(real / "rgba.webp", lossless=True)
    return 13


def test_unusual_modes(tmp_path):
    real = tmp_path / "real"
    write_unusual_images(real)

    assert load_rgb(real / "white16.png").mode == "RGB"
    assert Image.open(real / "palette.png").mode == "P" and Image.open(real / "bilevel.png").mode == "1"
    assert Image.open(real / "white16.png").mode.startswith("I")  # really 16 bit on disk
    assert check_folder(tmp_path).bad == []  # valid files are never quarantined
    batch = _take(build_loader(tmp_path, S, 13, num_workers=2), 1)[0]  # all 13 files, through the loader
    batch.validate()
    assert batch.images.shape == (13, 3, S, S)

    def color(rgb):
        return torch.tensor(rgb, dtype=torch.float32).div(127.5).sub(1).view(3, 1, 1).expand(3, S, S)

    for train in (True, False):
        torch.testing.assert_close(_tensor_of(real / "palette.png", train), color((10, 200, 30)))
        torch.testing.assert_close(_tensor_of(real / "palette_tr.png", train), torch.ones(3, S, S))
        torch.testing.assert_close(_tensor_of(real / "la.png", train), color((50, 50, 50)))
        torch.testing.assert_close(_tensor_of(real / "bilevel.png", train), torch.ones(3, S, S))
        torch.testing.assert_close(_tensor_of(real / "gray.jpg", train), color((200,) * 3), atol=2 / 127.5, rtol=0)
        torch.testing.assert_close(_tensor_of(real / "progressive.jpg", train), color((30, 60, 90)), atol=3 / 127.5,
                                   rtol=0)
        torch.testing.assert_close(_tensor_of(real / "rgba.webp", train), torch.ones(3, S, S))
        torch.testing.assert_close(_tensor_of(real / "gray.png", train), torch.full((3, S, S), 200 / 127.5 - 1))
        red = _tensor_of(real / "cmyk.jpg", train).mean(dim=(1, 2))
        assert red[0] > 0.9 and red[1] < -0.9 and red[2] < -0.9
        torch.testing.assert_close(_tensor_of(real / "rgba.png", train), torch.ones(3, S, S))
        torch.testing.assert_close(_tensor_of(real / "white16.png", train), torch.ones(3, S, S))
        torch.testing.assert_close(_tensor_of(real / "mid16.png", train), torch.full((3, S, S), 128 / 127.5 - 1))
        torch.testing.assert_close(_tensor_of(real / "tiny.png", train), torch.full((3, S, S), 10 / 127.5 - 1))


def test_header_size_matches_pillow(tmp_path, demo_root, monkeypatch):
    """`image_size` (the DALI loader's crop boxes) reads JPEG and PNG headers itself: same answer as Pillow."""
    write_unusual_images(tmp_path)
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a long APP1 segment before the frame header
    Image.new("RGB", (37, 23), (1, 2, 3)).save(tmp_path / "exif.jpg", exif=exif.tobytes())
    Image.new("RGB", (19, 41)).save(tmp_path / "plain.bmp")
    files = sorted(tmp_path.iterdir()) + sorted((demo_root / "val" / "real").iterdir())[:20]
    for path in files:
        data = path.read_bytes()
        with Image.open(path) as img:
            assert image_size(data) == img.size, path
    fill = b"\xff\xd8\xff\xff\xff" + (tmp_path / "exif.jpg").read_bytes()[3:]  # fill bytes before a marker
    assert image_size(fill) == (37, 23)
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        image_size(b"\xff\xd8\xff\xe0\x00")  # cut inside the header: Pillow's error reaches the caller
    direct = [p for p in files if p.suffix in (".jpg", ".png")]
    expected = [image_size(p.read_bytes()) for p in direct]
    monkeypatch.setattr(Image, "open", None)  # JPEG and PNG never reach Pillow
    assert [image_size(p.read_bytes()) for p in direct] == expected and len(direct) > 25


def test_load_eval_images(tmp_path):
    root = _make_root(tmp_path, n_real=6, n_fake=4)
    state = torch.get_rng_state()
    images, is_fake = load_eval_images(root, S, max_images=3)
    assert torch.equal(state, torch.get_rng_state())
    assert images.shape == (6, 3, S, S) and is_fake.tolist() == [0.0] * 3 + [1.0] * 3
    again, _ = load_eval_images(root, S, max_images=3)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    images, is_fake = load_eval_images(root, S)
    assert images.shape[0] == 10 and is_fake.sum() == 4


# ---------------------------------------------------------------------------------------- demo data

def test_demo_dataset_deterministic(tmp_path):
    counts = write_demo_dataset(tmp_path / "a", size=32, seed=3)
    assert counts["sources"] >= 10 and 800 <= counts["train"] <= 1200 and 100 <= counts["val"] <= 250
    assert counts["val"] >= load_config("tiny_cpu").eval.num_images  # the demo evaluates this many real images
    assert len(os.listdir(tmp_path / "a" / "train" / "real")) == counts["train"]
    assert len(os.listdir(tmp_path / "a" / "val" / "real")) == counts["val"]
    assert write_demo_dataset(tmp_path / "b", size=32, seed=3) == counts
    for rel in ("train/real/00000.jpg", "train/real/00417.jpg", "val/real/00009.jpg", "val/real/00199.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    for split in ("train", "val"):  # every byte
        folder_a, folder_b = tmp_path / "a" / split / "real", tmp_path / "b" / split / "real"
        assert all((folder_a / n).read_bytes() == (folder_b / n).read_bytes() for n in os.listdir(folder_a))
    manifest = json.loads((tmp_path / "a" / "demo.json").read_text())
    assert manifest == json.loads((tmp_path / "b" / "demo.json").read_text())
    assert set(manifest["train_sources"]).isdisjoint(manifest["val_sources"])
    assert manifest["val_sources"] == list(VAL_PHOTOS) and "lfw_subset" in manifest["train_sources"]
    assert len(manifest["train_sources"]) + len(manifest["val_sources"]) == counts["sources"]
    with Image.open(tmp_path / "a" / "val" / "real" / "00000.jpg") as img:
        assert img.size == (32, 32) and img.mode == "RGB"

    # Already complete with the same parameters: nothing is rewritten.
    before = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    assert write_demo_dataset(tmp_path / "a", size=32, seed=3) == counts
    assert {p: os.stat(p).st_mtime_ns for p in (tmp_path / "a").rglob("*")} == before

    # A different seed rewrites the folder with other crops.
    write_demo_dataset(tmp_path / "a", size=32, seed=4)
    first = "train/real/00000.jpg"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "b" / first).read_bytes()
    index = scan_folder(tmp_path / "a" / "train")
    assert len(index) == counts["train"] and index.num_fake == 0


def _flat_photos(monkeypatch, n_faces=6):
    """Stand-in sources for the demo writer: photograph k of PHOTO_SOURCES is one flat colour
    PALETTE[k], every face is flat gray 51: the colour of any crop names its source."""
    photos = [(name, Image.new("RGB", (90 + 7 * k, 60 + 5 * k), PALETTE[k])) for k, name in enumerate(PHOTO_SOURCES)]
    monkeypatch.setattr(demo, "_load_photos", lambda: photos)
    monkeypatch.setattr(demo, "_load_faces", lambda: np.full((n_faces, 25, 25), 0.2))


PALETTE = [(r, g, b) for r in (0, 128, 255) for g in (0, 128, 255) for b in (0, 128, 255)][:len(PHOTO_SOURCES)]
FACE_GRAY = (51, 51, 51)


def _sources_of(folder) -> list[str]:
    """The source of each NNNNN.jpg in `folder` (sorted), from its mean colour."""
    names = dict(zip(PALETTE, PHOTO_SOURCES)) | {FACE_GRAY: "lfw_subset"}
    out = []
    for path in sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9].jpg")):
        mean = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
        nearest = min(names, key=lambda c: float(((np.array(c) - mean) ** 2).sum()))
        assert float(np.abs(np.array(nearest) - mean).max()) < 8, (path, mean)
        out.append(names[nearest])
    return out


def test_demo_split_is_by_source_photograph(tmp_path, monkeypatch):
    """No photograph (nor the face set) gives crops to both splits; demo.json names each split's
    sources; val/ holds one photograph of each kind, and its first eval.num_images files cover them evenly."""
    _flat_photos(monkeypatch)
    counts = write_demo_dataset(tmp_path, size=16, seed=5)
    train = _sources_of(tmp_path / "train" / "real")
    val = _sources_of(tmp_path / "val" / "real")
    assert (len(train), len(val)) == (counts["train"], counts["val"])
    assert set(train).isdisjoint(val), set(train) & set(val)
    manifest = json.loads((tmp_path / "demo.json").read_text())
    assert manifest["format_version"] == 3
    assert set(manifest["train_sources"]) == set(train) and set(manifest["val_sources"]) == set(val)
    assert set(val) == set(VAL_PHOTOS) and {kind for kind, names in PHOTO_KINDS.items()
                                             if set(names) & set(val)} == set(PHOTO_KINDS)
    assert set(train) == set(PHOTO_SOURCES) - set(VAL_PHOTOS) | {"lfw_subset"} and train.count("lfw_subset") == 6
    head = val[: load_config("tiny_cpu").eval.num_images]
    assert max(head.count(n) for n in VAL_PHOTOS) - min(head.count(n) for n in VAL_PHOTOS) <= 1


def test_demo_rewrites_an_older_demo_folder(tmp_path, monkeypatch):
    """A folder written by the crop-level split (format_version 1, with "sources" and no
    train_sources / val_sources) is detected and rewritten; files that are not numbered stay."""
    _flat_photos(monkeypatch)
    for split, n in (("train", 1003), ("val", 177)):
        (tmp_path / split / "real").mkdir(parents=True)
        for k in range(n):
            (tmp_path / split / "real" / f"{k:05d}.jpg").write_bytes(b"old")
    (tmp_path / "val" / "real" / "mine.png").write_bytes(b"keep")
    old = {"format_version": 1, "size": 16, "seed": 5, "val_fraction": 0.15, "sources": ["astronaut"],
           "train": 1003, "val": 177}
    (tmp_path / "demo.json").write_text(json.dumps(old))
    counts = write_demo_dataset(tmp_path, size=16, seed=5)
    manifest = json.loads((tmp_path / "demo.json").read_text())
    assert manifest["format_version"] == 3 and manifest["val_sources"] == list(VAL_PHOTOS)
    assert counts["val"] > 177 and len(list((tmp_path / "val" / "real").glob("*.jpg"))) == counts["val"]
    assert len(list((tmp_path / "train" / "real").glob("*.jpg"))) == counts["train"]
    assert set(_sources_of(tmp_path / "train" / "real")).isdisjoint(_sources_of(tmp_path / "val" / "real"))
    assert (tmp_path / "val" / "real" / "mine.png").read_bytes() == b"keep"
    # a manifest of the current format that lacks the split lists is not taken as complete either
    del manifest["val_sources"]
    (tmp_path / "demo.json").write_text(json.dumps(manifest))
    write_demo_dataset(tmp_path, size=16, seed=5)
    assert json.loads((tmp_path / "demo.json").read_text())["val_sources"] == list(VAL_PHOTOS)

