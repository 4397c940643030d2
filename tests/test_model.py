"""The UniGenDet model: shapes, streams, experts, ownership, gradients, sampling."""
import pytest
import torch

from unigendet import ModelConfig, UniGenDet, euler_sample
from unigendet.config import ConfigError
from unigendet.model import patchify, unpatchify


def tiny(**kw):
    base = dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, kv_heads=1, registers=2,
                align_layer=1, projector_hidden=16)
    base.update(kw)
    torch.manual_seed(0)
    return UniGenDet(ModelConfig(**base))


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    tok = patchify(x, 4)
    assert tok.shape == (2, 16, 48)
    torch.testing.assert_close(unpatchify(tok, 4), x)
    # token 1 is the patch at row 0, column 1
    torch.testing.assert_close(tok[0, 1].view(3, 4, 4), x[0, :, 0:4, 4:8])


@pytest.mark.parametrize("experts", ["mot", "shared"])
@pytest.mark.parametrize("g2d,d2g", [(True, True), (False, True), (True, False), (False, False)])
def test_pass_shapes(experts, g2d, d2g):
    m = tiny(experts=experts, g2d=g2d, d2g=d2g)
    x = torch.randn(3, 3, 16, 16)
    out = m.generation_pass(x, torch.rand(3), capture_layer=1)
    assert out.velocity.shape == x.shape and out.hidden.shape == (3, 16, 32)
    det = m.detection_pass(x, capture_layer=1)
    assert det.logit.shape == (3,) and det.hidden.shape == (3, 16, 32)  # registers excluded
    assert m("det", x).logit.shape == (3,)
    with pytest.raises(ValueError, match="kind"):
        m("both", x)


def test_g2d_off_means_detector_expert_unused_by_generation():
    m = tiny(g2d=False)
    x = torch.randn(2, 3, 16, 16)
    m.generation_pass(x, torch.rand(2)).velocity.square().sum().backward()
    for name, p in m.named_parameters():
        if m.param_owner(name) == "det":
            assert p.grad is None, name
    m.zero_grad(set_to_none=True)
    m2 = tiny(g2d=True)
    m2.generation_pass(x, torch.rand(2)).velocity.square().sum().backward()
    # the generator head is zero-initialised, so only its own weights get gradient at step 0; check
    # the D stream's attention weights are reached once the head is non-zero
    torch.nn.init.normal_(m2.gen_head.proj.weight, std=0.1)
    m2.zero_grad(set_to_none=True)
    m2.generation_pass(x, torch.rand(2)).velocity.square().sum().backward()
    assert m2.blocks[0].experts["d"].qkv.weight.grad is not None


def test_d2g_off_means_detection_ignores_generator_expert():
    m = tiny(d2g=False)
    m.detection_pass(torch.randn(2, 3, 16, 16)).logit.sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if m.param_owner(n) == "gen")


def test_parameter_ownership():
    m = tiny()
    owners = {n: m.param_owner(n) for n, _ in m.named_parameters()}
    assert owners["blocks.0.experts.g.qkv.weight"] == "gen"
    assert owners["blocks.1.experts.d.down.weight"] == "det"
    assert owners["projector.0.weight"] == "gen" and owners["det_head.mlp.0.weight"] == "det"
    shared = tiny(experts="shared")
    assert shared.param_owner("blocks.0.experts.shared.qkv.weight") == "shared"
    assert shared.param_owner("stream_embed") == "shared"
    groups = shared.params_by_owner()
    assert sum(len(v) for v in groups.values()) == len(list(shared.parameters()))


def test_detection_is_per_image():
    """Images in a batch do not see each other: a sample's logit is the same alone or in a batch."""
    m = tiny()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(m.detection_pass(x).logit[1:2], m.detection_pass(x[1:2]).logit, atol=1e-5, rtol=1e-5)


def test_class_conditioning_and_guided_sampling():
    m = tiny(num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    torch.nn.init.normal_(m.gen_head.proj.weight, std=0.1)
    a = m.generation_pass(x, torch.full((2,), 0.5), torch.tensor([0, 1])).velocity
    b = m.generation_pass(x, torch.full((2,), 0.5), torch.tensor([2, 2])).velocity
    assert not torch.allclose(a, b)
    imgs = euler_sample(m, 5, steps=3, seed=1, class_ids=torch.tensor([0, 1, 2, 0, 1]), cfg_scale=2.0, batch_size=2)
    assert imgs.shape == (5, 3, 16, 16) and imgs.abs().max() <= 1


def test_sampler_is_deterministic_and_starts_from_noise():
    m = tiny()
    a = euler_sample(m, 3, steps=4, seed=7)
    b = euler_sample(m, 3, steps=4, seed=7)
    torch.testing.assert_close(a, b)
    # untrained head predicts v = 0: the sample is the clamped starting noise
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, noise.clamp(-1, 1))


def test_bad_model_config_names_the_key():
    with pytest.raises(ConfigError, match="patch_size"):
        UniGenDet(ModelConfig(image_size=30, patch_size=4))
    with pytest.raises(ConfigError, match="kv_heads"):
        UniGenDet(ModelConfig(heads=4, kv_heads=3))


def test_features_only_teacher_pass_matches_full_pass():
    m = tiny(depth=3, align_layer=2)
    x = torch.randn(2, 3, 16, 16)
    full = m.detection_pass(x, capture_layer=2)
    early = m.detection_pass(x, capture_layer=2, features_only=True)
    assert early.logit is None
    torch.testing.assert_close(early.hidden, full.hidden)


@pytest.mark.parametrize("g2d,d2g,g_causal,d_causal",
                         [(a, b, c, d) for a in (False, True) for b in (False, True)
                          for c in (False, True) for d in (False, True)])
def test_detector_logit_reads_every_image_token(g2d, d2g, g_causal, d_causal):
    """Perturbing any one patch of the image changes the logit, under every switch setting (the CLS
    register follows the image tokens, so a causal detector stream still lets it read all of them)."""
    m = tiny(g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal, image_size=8, depth=2).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    base = m("det", x).logit
    for row in range(2):
        for col in range(2):
            y = x.clone()
            y[:, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 0.5
            assert (m("det", y).logit - base).abs().min() > 1e-9, (row, col)


def test_registers_follow_the_image_tokens():
    m = tiny(registers=3)
    x = torch.randn(2, 3, 16, 16)
    tokens = m.det_embed(x)  # (B, N + R, C)
    assert tokens.shape == (2, 16 + 3, 32)
    torch.testing.assert_close(tokens[:, 16:], m.det_embed.registers.expand(2, -1, -1))
    assert m.det_head.cls_index == 16
    assert torch.all(m.rope_cos_d[16:] == 1) and torch.all(m.rope_sin_d[16:] == 0)  # registers: no position


@pytest.mark.parametrize("experts", ["mot", "shared"])
def test_constant_detector_generation_pass(experts):
    """Same values; no gradient reaches detector-owned weights; the generator's gradient is unchanged."""
    m = tiny(experts=experts, g2d=True)
    torch.nn.init.normal_(m.gen_head.proj.weight, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    free = m.generation_pass(x, t).velocity
    const = m.generation_pass(x, t, constant_detector=True).velocity
    assert torch.equal(free, const)
    det = [p for n, p in m.named_parameters() if m.param_owner(n) == "det"]
    rest = [p for n, p in m.named_parameters() if m.param_owner(n) != "det"]
    g_free = torch.autograd.grad(free.square().sum(), det + rest, allow_unused=True)
    g_const = torch.autograd.grad(const.square().sum(), det + rest, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_free[:len(det)])  # g2d: the pass reads D
    assert all(g is None for g in g_const[:len(det)])
    for a, b in zip(g_free[len(det):], g_const[len(det):]):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_timestep_grid_is_the_shifted_uniform_grid():
    from unigendet.model.sampling import timestep_grid

    assert timestep_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert timestep_grid(7, 1.0) == [1.0 - i / 7 for i in range(8)]  # shift 1: the uniform grid, exactly
    for shift in (3.0, 0.1, 1.5, 10.0):
        grid = timestep_grid(50, shift)
        assert len(grid) == 51 and grid[0] == 1.0 and grid[-1] == 0.0
        assert all(a > b for a, b in zip(grid, grid[1:])), shift  # strictly from 1 down to 0
        for i, t in enumerate(grid):
            u = 1.0 - i / 50
            assert t == pytest.approx(shift * u / (1 + (shift - 1) * u), rel=1e-12, abs=1e-15)
    assert timestep_grid(2, 3.0) == pytest.approx([1.0, 0.75, 0.0])  # 3 * 0.5 / (1 + 2 * 0.5)
    assert all(s > u for s, u in zip(timestep_grid(8, 3.0)[1:-1], timestep_grid(8)[1:-1]))  # > 1: more noise
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timestep shift"):
            timestep_grid(4, bad)


def _reference_euler(model, n, steps, seed):
    """The sampler before the timestep shift existed, verbatim (uniform grid)."""
    generator = torch.Generator().manual_seed(seed)
    S = model.cfg.image_size
    x = torch.randn(n, 3, S, S, generator=generator, dtype=torch.float32)
    for i in range(steps):
        t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
        v = model("gen", x, torch.full((n,), t), None).velocity.float()
        x = x + (t_next - t) * v
    return x.clamp(-1, 1)


def test_unshifted_sampler_is_bitwise_the_uniform_sampler():
    m = tiny()
    torch.nn.init.normal_(m.gen_head.proj.weight, std=0.1)  # a non-zero velocity
    ref = _reference_euler(m, 3, 5, seed=3)
    for kwargs in ({}, {"shift": 1.0}, {"shift": 1}):
        assert torch.equal(euler_sample(m, 3, steps=5, seed=3, **kwargs), ref), kwargs
    shifted = euler_sample(m, 3, steps=5, seed=3, shift=3.0)
    assert not torch.equal(shifted, ref)


def test_shifted_sampler_evaluates_the_model_on_the_shifted_grid(monkeypatch):
    from unigendet.model.sampling import timestep_grid

    m = tiny()
    seen = []
    real = m.generation_pass

    def spy(x_t, t, *args, **kwargs):
        seen.append(float(t[0]))
        return real(x_t, t, *args, **kwargs)

    monkeypatch.setattr(m, "generation_pass", spy)
    euler_sample(m, 2, steps=6, seed=0, shift=3.0)
    assert seen == [float(torch.tensor(t, dtype=torch.float32)) for t in timestep_grid(6, 3.0)[:-1]]
    with pytest.raises(ValueError, match="timestep shift"):
        euler_sample(m, 2, steps=6, seed=0, shift=0.0)


def test_projector_activation_and_width():
    default = tiny(projector_hidden=16)
    shapes = {n: tuple(p.shape) for n, p in default.named_parameters() if n.startswith("projector.")}
    # the default (silu) projector keeps the parameter names and shapes older checkpoints have
    assert shapes == {"projector.0.weight": (16, 32), "projector.0.bias": (16,),
                      "projector.2.weight": (32, 16), "projector.2.bias": (32,)}
    assert isinstance(default.projector[1], torch.nn.SiLU)
    gelu = tiny(projector_hidden=0, projector_act="gelu")  # 0 = 4 * width
    assert isinstance(gelu.projector[1], torch.nn.GELU)
    assert gelu.projector[0].weight.shape == (4 * 32, 32) and gelu.projector[2].weight.shape == (32, 4 * 32)
    assert [n for n, _ in gelu.named_parameters() if n.startswith("projector.")] == list(shapes)
    x = torch.randn(2, 5, 32)
    lin0, lin2 = gelu.projector[0], gelu.projector[2]
    torch.testing.assert_close(gelu.projector(x), lin2(torch.nn.functional.gelu(lin0(x))))
    with pytest.raises(ConfigError, match="projector_act"):
        tiny(projector_act="relu")
    with pytest.raises(ConfigError, match="projector_hidden"):
        tiny(projector_hidden=-1)
