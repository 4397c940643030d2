"""Precomputed latents in shards (`unigendet data pack --vae`: engine/data/pack.py, engine/data/latents.py):
the moments pack stores, both loaders returning them with the pixels of the same crop (flipped together),
and the refusals: another VAE or image size, a random resized crop, a damaged member, no diffusers."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

pytest.importorskip("diffusers")

from test_data import _make_root, _take  # noqa: E402
from test_data_dali import assert_same_samples  # noqa: E402
from tiny_vae import TINY_VAE_CHANNELS, TINY_VAE_DOWNSAMPLE, make_tiny_vae  # noqa: E402
from unigendet.cli import main as cli_main  # noqa: E402
from unigendet.data import DataError, FolderDataset, build_loader, pack_folder, scan_data  # noqa: E402
from unigendet.data.images import crop_resize, decode_rgb  # noqa: E402
from unigendet.data.loaders.dali import dali_reason  # noqa: E402
from unigendet.data.sources.shards import MANIFEST_NAME  # noqa: E402
from unigendet.vae import VAE_EXTRA, load_vae, vae_fingerprint  # noqa: E402

S = 16  # image size: latents are (8, 8, 8) with the tiny VAE
MOMENTS_SHAPE = (2 * TINY_VAE_CHANNELS, S // TINY_VAE_DOWNSAMPLE, S // TINY_VAE_DOWNSAMPLE)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, vae_dir):
    """(image folder, its shards with latents at S px, the manifest): 9 real + 5 fake noise images of
    varied sizes and aspect ratios, 4 samples per shard."""
    tmp = tmp_path_factory.mktemp("latents")
    root = _make_root(tmp / "src", n_real=9, n_fake=5, classes=("cat", "dog"))
    manifest = pack_folder(root, tmp / "shards", samples_per_shard=4, seed=3, vae=vae_dir, image_size=S)
    return root, str(tmp / "shards"), manifest


def latent_loader(shards, vae_dir, loader="pil", **kwargs):
    kwargs = {"seed": 1, "crop": "center", "vae_fingerprint": vae_fingerprint(vae_dir), **kwargs}
    if loader == "pil":
        kwargs.setdefault("num_workers", 0)
    return build_loader(shards, S, 7, loader=loader, **kwargs)


def test_pack_stores_the_moments_of_the_center_crop(packed, vae_dir):
    """Each sample's member is float16 (2C, h, w) and equals the encoder's moments of the center crop
    the loaders give, within float16 rounding; the manifest names the VAE and the size."""
    _, shards, manifest = packed
    assert manifest["latents"] == {"vae_fingerprint": vae_fingerprint(vae_dir), "vae": os.path.abspath(vae_dir),
                                   "image_size": S, "crop": "center", "dtype": "float16",
                                   "shape": list(MOMENTS_SHAPE)}
    index, vae = scan_data(shards), load_vae(vae_dir)
    assert index.latents == manifest["latents"] and len(index.latent_locations) == len(index) == 14
    for i in range(len(index)):
        stored = load_safetensors(index.read_latent_bytes(i))["moments"]
        assert stored.dtype == torch.float16 and tuple(stored.shape) == MOMENTS_SHAPE
        crop = crop_resize(decode_rgb(index.read_bytes(i), index.files[i]), S, None)  # (3, S, S)
        expected = vae.encode_moments(crop[None])[0]  # (2C, h, w) float32
        torch.testing.assert_close(stored.float(), expected, rtol=1e-3, atol=1e-3)
        assert not torch.equal(stored.float(), expected.half().float().flip(-1))  # not stored mirrored


def test_the_dataset_flips_pixels_and_moments_together(packed):
    """A training item is the center crop and its moments, both mirrored or both not; flips happen."""
    _, shards, _ = packed
    index = scan_data(shards)
    plain = FolderDataset(index, S, seed=0, train=False, latents=True)  # center crop, never flipped
    train = FolderDataset(index, S, seed=5, crop="center", latents=True)
    flipped = 0
    for i in range(len(index)):
        image0, fake0, class0, moments0 = plain[i]
        image, fake, class_id, moments = train[i]
        assert (fake, class_id) == (fake0, class0) and moments.dtype == torch.float32
        mirrored = not torch.equal(image, image0)
        flipped += mirrored
        want_image, want_moments = (image0.flip(-1), moments0.flip(-1)) if mirrored else (image0, moments0)
        assert torch.equal(image, want_image) and torch.equal(moments, want_moments)
    assert 0 < flipped < len(index)


def test_loader_batches_carry_the_moments(packed, vae_dir):
    _, shards, _ = packed
    loader = latent_loader(shards, vae_dir)
    assert loader.latents
    for batch in _take(loader, 3):  # 2 batches per epoch: crosses an epoch boundary
        batch.validate()
        assert batch.latent_moments.shape == (7, *MOMENTS_SHAPE)


@pytest.mark.skipif(dali_reason() is not None, reason=f"{dali_reason()}")
def test_pil_and_dali_give_the_same_latent_batches(packed, vae_dir):
    """Equal moments (read and mirrored on the host by both), the same crops and flips of the pixels."""
    _, shards, _ = packed
    pil = _take(latent_loader(shards, vae_dir, "pil"), 4)
    dali = _take(latent_loader(shards, vae_dir, "dali"), 4)
    assert_same_samples(pil, dali)
    for a, b in zip(pil, dali):
        assert b.latent_moments.dtype == torch.float32 and torch.equal(a.latent_moments, b.latent_moments)
    # the flips are those of the pixels: a mirrored image is closer to its mirrored PIL twin
    for a, b in zip(pil, dali):
        for x, y in zip(a.images, b.images):
            assert (x - y).abs().mean() < (x.flip(-1) - y).abs().mean()


def test_pixel_runs_ignore_latents_and_folders_have_none(packed, vae_dir):
    """Without a VAE the shards are plain image shards; a VAE run on an image folder gets no moments
    (the trainer encodes on the fly), with any crop."""
    root, shards, _ = packed
    pixel = build_loader(shards, S, 7, seed=1, num_workers=0)
    assert not pixel.latents and _take(pixel, 1)[0].latent_moments is None
    folder = build_loader(root, S, 7, seed=1, num_workers=0, vae_fingerprint=vae_fingerprint(vae_dir))
    assert not folder.latents and _take(folder, 1)[0].latent_moments is None


def test_another_vae_or_image_size_is_refused_in_one_line(packed, vae_dir, tmp_path):
    _, shards, manifest = packed
    other = vae_fingerprint(make_tiny_vae(tmp_path / "other", seed=1))
    packed_fp = manifest["latents"]["vae_fingerprint"]
    with pytest.raises(DataError) as vae_error:
        latent_loader(shards, vae_dir, vae_fingerprint=other)
    assert packed_fp in str(vae_error.value) and other in str(vae_error.value) and "\n" not in str(vae_error.value)
    with pytest.raises(DataError, match=rf"at {S} px, this run uses VAE {packed_fp} at data.image_size = 8 px"):
        build_loader(shards, 8, 7, crop="center", num_workers=0, vae_fingerprint=packed_fp)


@pytest.mark.parametrize("loader", ["pil", "dali"])
def test_random_resized_crop_is_refused_with_precomputed_latents(packed, vae_dir, loader):
    if loader == "dali" and dali_reason():
        pytest.skip(dali_reason())
    _, shards, _ = packed
    with pytest.raises(DataError, match=r"data.crop = 'random_resized' cannot be used with the precomputed "
                                        r"latents .* set --data.crop=center"):
        latent_loader(shards, vae_dir, loader, crop="random_resized")


def test_data_crop_is_a_config_choice():
    from unigendet.config import ConfigError, load_config

    assert load_config("tiny_cpu", ["--data.crop=center"]).data.crop == "center"
    assert load_config("tiny_cpu", []).data.crop == "random_resized"  # the pixel path's default is unchanged
    with pytest.raises(ConfigError, match="data.crop"):
        load_config("tiny_cpu", ["--data.crop=middle"])


def test_damaged_latents_name_the_member(packed, vae_dir, tmp_path):
    """A garbled moments member, a manifest field of the wrong type and a sample without its member are
    errors naming the file."""
    _, shards, _ = packed
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(shards):
        (copy / name).write_bytes(open(os.path.join(shards, name), "rb").read())
    index = scan_data(copy)
    tar, offset, size = index.latent_locations[0]
    with open(tar, "r+b") as f:  # the member's header length field: now it claims more than the member
        f.seek(offset)
        f.write(b"\xff" * 8)
    with pytest.raises(DataError, match=r"\.latent\.safetensors: not a safetensors file"):
        FolderDataset(index, S, seed=0, crop="center", latents=True)[0]

    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["latents"]["image_size"] = "16"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{MANIFEST_NAME}: field latents.image_size missing or not a int"):
        scan_data(copy)

    manifest["latents"]["image_size"] = S
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    idx = copy / "shard-000000.idx"
    lines = idx.read_text().split("\n")
    fields = lines[1].split()
    lines[1] = " ".join(f for k in range(0, len(fields), 4) if fields[k] != "latent.safetensors"
                        for f in fields[k : k + 4])
    idx.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"shard-000000\.tar: sample \(.*\) needs one \.latent\.safetensors member"):
        scan_data(copy)


def test_cli_pack_with_vae(tmp_path, vae_dir, capsys):
    root = _make_root(tmp_path / "src", n_real=5)
    out = tmp_path / "shards"
    assert cli_main(["data", "pack", root, "--out", str(out), "--vae", str(vae_dir), "--image-size", str(S)]) == 0
    text = capsys.readouterr().out
    assert f"latents: moments {MOMENTS_SHAPE} float16 per image, the center crop at {S} px" in text
    assert f"--model.vae={os.path.abspath(vae_dir)} --data.image_size={S} --data.crop=center" in text
    assert scan_data(out).latents["image_size"] == S
    odd = ["data", "pack", root, "--out", str(tmp_path / "odd"), "--vae", str(vae_dir), "--image-size", "15"]
    assert cli_main(odd) == 2
    assert "--image-size 15 is not a multiple of 2" in capsys.readouterr().err
    assert cli_main(["data", "pack", root, "--out", str(tmp_path / "size"), "--image-size", "16"]) == 2
    assert "give --vae VAE_DIR too" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists() and not (tmp_path / "size").exists()


def test_cli_pack_without_diffusers_names_the_extra(tmp_path, vae_dir, capsys, monkeypatch):
    root = _make_root(tmp_path / "src", n_real=3)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    assert cli_main(["data", "pack", root, "--out", str(tmp_path / "shards"), "--vae", str(vae_dir)]) == 2
    err = capsys.readouterr().err
    assert "diffusers" in err and f'pip install ".[{VAE_EXTRA}]"' in err
    assert not (tmp_path / "shards").exists()  # nothing decoded or written before the VAE loads


def test_quarantine_and_resume_keep_each_sample_with_its_moments(packed, vae_dir):
    """Dropping samples (a quarantine list) keeps every image with its own member, and a restored loader
    continues with the next batch's moments."""
    _, shards, _ = packed
    full = scan_data(shards)
    part = full.subset([5, 0, 9])
    for k, i in enumerate([5, 0, 9]):
        assert part.read_bytes(k) == full.read_bytes(i) and part.read_latent_bytes(k) == full.read_latent_bytes(i)
    straight = _take(latent_loader(shards, vae_dir), 5)
    first = latent_loader(shards, vae_dir)
    _take(first, 3)
    resumed = latent_loader(shards, vae_dir)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(straight[3:], _take(resumed, 2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.latent_moments, b.latent_moments)


@pytest.mark.skipif(dali_reason() is not None, reason=f"{dali_reason()}")
def test_latent_members_are_in_dalis_index(packed):
    """The .idx files of a latent pack equal DALI's wds2idx output, and fn.readers.webdataset reads the
    moments members by their extension."""
    from nvidia.dali import fn, pipeline_def, types
    from wds2idx import IndexCreator

    _, shards, manifest = packed
    tars = [os.path.join(shards, s["tar"]) for s in manifest["shards"]]
    idxs = [os.path.join(shards, s["index"]) for s in manifest["shards"]]
    for tar, idx in zip(tars, idxs):
        with IndexCreator(tar, idx + ".ref", verbose=False) as creator:
            creator.create_index()
        reference = open(idx + ".ref").read()
        os.remove(idx + ".ref")
        assert reference == open(idx).read()

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def read_latents():
        return fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["latent.safetensors"],
                                     missing_component_behavior="error", random_shuffle=False, dtypes=[types.UINT8])

    pipe = read_latents()
    pipe.build()
    index = scan_data(shards)
    got = [np.array(out[k]).tobytes() for _ in range(2) for (out,) in [pipe.run()] for k in range(7)]
    assert got == [index.read_latent_bytes(i) for i in range(14)]
