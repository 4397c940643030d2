"""The frozen VAE of the latent path (unigendet.vae), on a tiny random AutoencoderKL saved to disk."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_vae import TINY_VAE_CHANNELS, TINY_VAE_DOWNSAMPLE, make_tiny_vae  # noqa: E402
from unigendet.vae import VAE_EXTRA, VAEError, load_vae, sample_latents, vae_fingerprint  # noqa: E402


def images(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_loaded_frozen_with_its_geometry(vae):
    assert not vae.module.training
    assert all(not p.requires_grad for p in vae.module.parameters())
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    assert (vae.latent_channels, vae.downsample) == (TINY_VAE_CHANNELS, TINY_VAE_DOWNSAMPLE)
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, pytest.approx(0.1))


def test_moments_and_normalised_latents(vae):
    x = images()
    moments = vae.encode_moments(x)
    assert moments.shape == (2, 2 * TINY_VAE_CHANNELS, 8, 8) and moments.dtype == torch.float32
    # the posterior diffusers itself computes, sampled with the same noise
    dist = vae.module.encode(x).latent_dist
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.logvar], 1))
    latents = vae.sample_latents(moments, torch.Generator().manual_seed(3))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latents, (dist.mean + dist.std * eps - 0.1) * 0.5)
    # decode undoes the normalisation before the decoder
    torch.testing.assert_close(vae.decode(latents), vae.module.decode(latents / 0.5 + 0.1).sample)


def test_same_generator_same_latents(vae):
    moments = vae.encode_moments(images())
    a = vae.sample_latents(moments, torch.Generator().manual_seed(7))
    b = sample_latents(moments.half(), torch.Generator().manual_seed(7), vae.scaling_factor, vae.shift_factor)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)  # fp16-packed moments give the same latents
    assert not torch.equal(a, vae.sample_latents(moments, torch.Generator().manual_seed(8)))


def test_decode_is_differentiable_in_the_latents_only(vae):
    latents = vae.sample_latents(vae.encode_moments(images()), None).requires_grad_(True)
    out = vae.decode(latents)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    out.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.module.parameters())


def test_no_shift_factor_means_zero(tmp_path):
    vae = load_vae(make_tiny_vae(tmp_path / "sd", shift_factor=None))
    assert vae.shift_factor == 0.0


def test_bad_folders_name_the_folder(tmp_path, vae):
    with pytest.raises(VAEError, match=str(tmp_path / "missing")):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(VAEError, match="cannot load it") as err:
        load_vae(broken)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VAEError, match=r"\(B, 8, h, w\)"):
        vae.sample_latents(torch.zeros(1, 4, 8, 8), None)
    with pytest.raises(VAEError, match="multiple of the VAE's downsampling factor 2"):
        vae.encode_moments(torch.zeros(1, 3, 15, 15))


def test_missing_diffusers_names_the_extra(vae_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(VAEError, match=rf'pip install "\.\[{VAE_EXTRA}\]"'):
        load_vae(vae_dir)


def test_fingerprint_follows_the_weights(tmp_path):
    a = make_tiny_vae(tmp_path / "a", seed=0)
    b = make_tiny_vae(tmp_path / "b", seed=0)
    c = make_tiny_vae(tmp_path / "c", seed=1)
    assert vae_fingerprint(a) == vae_fingerprint(b) != vae_fingerprint(c)
    assert len(vae_fingerprint(a)) == 64
