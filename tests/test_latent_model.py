"""The latent model: its config rules, the generator stream on latents, the DIGA grid resize, and
L_auth's gradient through the frozen decoder."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from unigendet import ConfigError, load_config  # noqa: E402
from unigendet.config import ModelConfig  # noqa: E402
from unigendet.data import Batch  # noqa: E402
from unigendet.model import UniGenDet, euler_sample  # noqa: E402
from unigendet.phase_modes import schedule  # noqa: E402
from unigendet.train.latent_inputs import LatentInputs  # noqa: E402
from unigendet.train.phases import authenticity_logit, phase_loss, set_trainable  # noqa: E402

TINY = dict(image_size=32, patch_size=4, width=32, depth=2, heads=2, kv_heads=1, align_layer=1, projector_hidden=32,
            g2d=False, d2g=False, latent_channels=4, latent_downsample=2)


def latent_model(vae, **changes):
    torch.manual_seed(0)
    model = UniGenDet(ModelConfig(**{**TINY, "vae": vae.path, **changes}))
    model.attach_vae(vae)
    for p in model.gen_head.parameters():  # a zero head (the init) would make every gradient below vanish
        torch.nn.init.normal_(p, std=0.02)
    return model


def images(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_reads_the_vae_geometry_and_checks_the_grids(vae_dir, tmp_path):
    latent = [f"--model.vae={vae_dir}", "--model.g2d=false", "--model.d2g=false"]
    m = load_config("tiny_cpu", latent).model
    assert (m.latent_channels, m.latent_downsample, m.latent_patch_size) == (4, 2, 2)
    with pytest.raises(ConfigError, match="command line .*model.vae .latent generator. needs model.g2d = false"):
        load_config("tiny_cpu", [f"--model.vae={vae_dir}"])
    assert load_config("tiny_cpu", [f"--model.vae={vae_dir}", "--model.g2d=false"]).model.d2g  # the published layout
    with pytest.raises(ConfigError, match="not a multiple of the VAE's downsampling factor 2 x "
                                          "model.latent_patch_size 3 = 6"):
        load_config("tiny_cpu", [*latent, "--model.latent_patch_size=3"])
    with pytest.raises(ConfigError, match=f"model.vae: {tmp_path / 'missing'}: .*does not exist"):
        load_config("tiny_cpu", [f"--model.vae={tmp_path / 'missing'}", "--model.g2d=false", "--model.d2g=false"])
    with pytest.raises(ConfigError, match="model.latent_channels and model.latent_downsample must be set"):
        UniGenDet(ModelConfig(**{**TINY, "vae": str(vae_dir), "latent_channels": 0}))


def test_generator_stream_on_latents(vae):
    model = latent_model(vae)
    assert model.x_shape == (4, 16, 16) and (model.gen_grid, model.det_grid) == (8, 8)
    out = model("gen", torch.randn(2, 4, 16, 16), torch.rand(2), capture_layer=1)
    assert out.velocity.shape == (2, 4, 16, 16) and out.hidden.shape == (2, 64, 32)
    assert model("det", images()).logit.shape == (2,)
    sample = euler_sample(model, 3, steps=2, seed=0)  # integrates latents, returns decoded images
    assert sample.shape == (3, 3, 32, 32) and sample.abs().max() <= 1
    assert "_vae" not in dict(model.named_children()) and not any("vae" in k for k in model.state_dict())


def test_unattached_vae_is_a_clear_error(vae_dir):
    model = UniGenDet(ModelConfig(**{**TINY, "vae": str(vae_dir)}))
    with pytest.raises(ValueError, match="attach it first"):
        euler_sample(model, 1, steps=1, seed=0)


def test_teacher_equal_grids_pair_token_i_with_token_i(vae):
    model = latent_model(vae)  # 8x8 latent tokens (16 / 2), 8x8 pixel tokens (32 / 4)
    hidden = torch.randn(2, 64, 32)
    assert model.teacher_on_gen_grid(hidden) is hidden


def test_teacher_resized_bilinearly_onto_the_generator_grid(vae):
    model = latent_model(vae, latent_patch_size=1)  # 16x16 latent tokens against 8x8 pixel tokens
    assert (model.gen_grid, model.det_grid) == (16, 8)
    hidden = torch.randn(2, 64, 32)
    resized = model.teacher_on_gen_grid(hidden)
    grid = hidden.transpose(1, 2).reshape(2, 32, 8, 8)
    expected = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(resized, expected)
    # the alignment loss of a generating phase runs on the 16x16 grid
    cfg = load_config("tiny_cpu")
    phase = schedule("diga")[0]
    set_trainable(model, phase)
    latents = torch.randn(2, 4, 16, 16)
    terms = phase_loss(model, phase, images(), torch.zeros(2), torch.full((2,), -1), None, cfg.loss, None, latents)
    terms.total.backward()
    assert terms.parts["align"] > 0 and model.projector[0].weight.grad is not None


def test_detection_with_d2g_reads_the_posterior_means_of_its_pixels(vae):
    model = latent_model(vae, d2g=True).eval()
    x = images(3)
    means = vae.encode_latents(x)  # (3, 4, 16, 16)
    encoded = model("det", x).logit  # None: the model encodes x itself
    torch.testing.assert_close(model("det", x, latents=means).logit, encoded)
    torch.testing.assert_close(means, vae.mean_latents(vae.encode_moments(x)))
    # the generator stream is read: other latents, another logit
    assert not torch.allclose(model("det", x, latents=torch.roll(means, 1, 0)).logit, encoded)
    without = latent_model(vae, d2g=False).eval()
    torch.testing.assert_close(without("det", x, latents=torch.roll(means, 1, 0)).logit, without("det", x).logit)
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, 16, 16\), got \(3, 4, 8, 8\)"):
        model("det", x, latents=means[..., :8, :8])


@pytest.mark.parametrize("d2g", [False, True])
def test_authenticity_gradient_flows_through_the_frozen_decoder(vae, d2g):
    """With d2g the detector also reads encode(decode(x0_hat)): the gradient then flows through the
    frozen encoder as well."""
    model = latent_model(vae, d2g=d2g)
    phase = schedule("joint")[0]  # trains everything: L_auth must still reach the generator only
    set_trainable(model, phase)
    x_t, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8])
    velocity = model("gen", x_t, t).velocity  # (2, 4, 16, 16)
    logit = authenticity_logit(model, phase, x_t, t, None, velocity)
    # the same logit differentiated directly through decode and the detector (weights detached)
    v = velocity.detach().requires_grad_()
    x0_hat = x_t - t.view(-1, 1, 1, 1) * v
    det = torch.func.functional_call(model, {k: p.detach() for k, p in model.named_parameters()},
                                     ("det", vae.decode(x0_hat)))
    (expected,) = torch.autograd.grad(det.logit.sum(), v)
    (got,) = torch.autograd.grad(logit.sum(), velocity, retain_graph=True)
    torch.testing.assert_close(logit, det.logit.detach())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0
    logit.sum().backward()
    assert model.gen_head.proj.weight.grad.abs().sum() > 0  # reached the generator
    assert all(p.grad is None for n, p in model.named_parameters() if model.param_owner(n) == "det")
    assert all(p.grad is None for p in vae.module.parameters())  # and never the VAE


def test_packed_moments_give_the_latents_of_on_the_fly_encoding(vae):
    x = images(4)
    inputs = LatentInputs(vae, seed=3, rank=0)
    plain = Batch(x, torch.zeros(4), torch.full((4,), -1))
    packed = dataclasses.replace(plain, latent_moments=vae.encode_moments(x).half().float())  # stored as fp16

    def load(batch, step):
        inputs.load(batch, x, step, samples=True, means=True)
        return inputs.buffer.clone(), inputs.means.clone()

    on_the_fly, means = load(plain, 5)
    packed_latents, packed_means = load(packed, 5)
    torch.testing.assert_close(packed_latents, on_the_fly, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(packed_means, means, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(means, vae.encode_latents(x))  # the detection passes' latents: the means
    assert not torch.equal(load(plain, 6)[0], on_the_fly)  # fresh noise each step
    assert torch.equal(load(plain, 5)[0], on_the_fly)  # a function of the step (resume)
    assert torch.equal(load(plain, 6)[1], means)  # the means draw no noise
