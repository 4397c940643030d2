"""model.mmsa_layers (the layers where the streams read each other) and the skipped work of the
stream whose output a pass does not use (its last needed layer runs as keys and values only)."""
import pytest
import torch

from unigendet import ModelConfig, UniGenDet, load_config, ops
from unigendet.config import ConfigError, config_from_dict, dumps, mmsa_layer_set
from unigendet.train.throughput import train_flops_per_sample

S = 16  # image side: N = 16 image tokens per stream (patch 4)


def tiny(**kw):
    base = dict(image_size=S, patch_size=4, width=32, depth=3, heads=2, kv_heads=1, registers=2,
                align_layer=2, projector_hidden=16)
    base.update(kw)
    torch.manual_seed(0)
    m = UniGenDet(ModelConfig(**base))
    torch.nn.init.normal_(m.gen_head.proj.weight, std=0.1)  # zero at init: gradients would not reach the blocks
    return m


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("text,want", [("all", "all"), ("none", "none"), ("1,3", (1, 3)), ("[2]", (2,)),
                                       ("", ()), ("[]", ()), ("4", (4,))])
def test_config_command_line_and_toml_round_trip(text, want):
    import tomllib

    cfg = load_config("tiny_cpu", [f"--model.mmsa_layers={text}"])
    assert cfg.model.mmsa_layers == want
    again = config_from_dict(tomllib.loads(dumps(cfg)))
    assert again.model.mmsa_layers == want
    assert mmsa_layer_set(cfg.model) == ({1, 2, 3, 4} if want == "all" else set() if want == "none" else set(want))
    # the TOML list form
    toml = config_from_dict({"model": {"mmsa_layers": list(want) if isinstance(want, tuple) else want}})
    assert toml.model.mmsa_layers == want


def test_default_is_all_layers():
    assert ModelConfig().mmsa_layers == "all"
    assert load_config("tiny_cpu").model.mmsa_layers == "all"


@pytest.mark.parametrize("value,match", [("0", "must be in \\[1, model.depth=4\\]"), ("5", "must be in"),
                                         ("2,2", "lists a layer twice"), ("1.5", "must be 'all'"),
                                         ("x", "must be 'all'"), ("1,x", "must be 'all'")])
def test_config_errors_command_line(value, match):
    with pytest.raises(ConfigError, match="model.mmsa_layers.*" + match) as e:
        load_config("tiny_cpu", [f"--model.mmsa_layers={value}"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value,match", [([1, "a"], "expected an integer"), ([True], "expected an integer"),
                                         (3, "expected a list"), ([1.5], "expected an integer"),
                                         ([0, 1], "must be in"), ([1, 1], "twice"), ("some", "must be 'all'")])
def test_config_errors_toml(value, match):
    with pytest.raises(ConfigError, match="model.mmsa_layers.*" + match):
        config_from_dict({"model": {"mmsa_layers": value}})


@pytest.mark.parametrize("value", [[0], [4], [1, 1], [True], ["1"], "every", 2])
def test_check_model_in_code(value):
    with pytest.raises(ConfigError, match="model.mmsa_layers"):
        UniGenDet(ModelConfig(image_size=S, depth=3, align_layer=1, mmsa_layers=value))


def test_flop_count_counts_cross_pairs_in_mmsa_layers_only():
    m = ModelConfig(image_size=S, depth=4)
    t_g = (S // m.patch_size) ** 2
    t_d = t_g + m.registers
    none = ModelConfig(image_size=S, depth=4, mmsa_layers="none")
    per_layer = 12.0 * 2 * t_g * t_d * m.width  # both directions, H * D = C
    assert train_flops_per_sample(m) - train_flops_per_sample(none) == pytest.approx(4 * per_layer)
    two = ModelConfig(image_size=S, depth=4, mmsa_layers=(1, 3))
    assert train_flops_per_sample(two) - train_flops_per_sample(none) == pytest.approx(2 * per_layer)
    assert train_flops_per_sample(ModelConfig(image_size=S, depth=4, mmsa_layers=())) == train_flops_per_sample(none)


# ----------------------------------------------------------------------------- which layers are MMSA


class Spy:
    """Records (g2d, d2g, which of q_g, k_g, q_d, k_d are given) of every mmsa_attention call."""

    def __init__(self, monkeypatch):
        self.calls, real = [], ops.mmsa_attention

        def spy(q_g, k_g, v_g, q_d, k_d, v_d, **kw):
            self.calls.append((kw["g2d"], kw["d2g"], tuple(t is not None for t in (q_g, k_g, q_d, k_d))))
            return real(q_g, k_g, v_g, q_d, k_d, v_d, **kw)

        monkeypatch.setattr(ops, "mmsa_attention", spy)


def _today(m: UniGenDet, x, t):
    """The generation pass as the model computed it before mmsa_layers and the skipping: every layer
    with the global switches, both streams in full."""
    states = {"g": (m.gen_embed(x, t, None), None), "d": (m.det_embed(x), None)}
    rope = {s: (getattr(m, f"rope_cos_{s}"), getattr(m, f"rope_sin_{s}")) for s in states}
    for block in m.blocks:
        states = block(states, rope, m.mask)
    return m.gen_head(*states["g"])


def test_default_equals_todays_model_bitwise():
    m = tiny()
    x, t = torch.randn(2, 3, S, S), torch.rand(2)
    want = _today(m, x, t)
    m.skip_unused = False
    assert torch.equal(m.generation_pass(x, t).velocity, want)
    explicit = tiny(mmsa_layers=[1, 2, 3])
    explicit.load_state_dict(m.state_dict())
    explicit.skip_unused = False
    assert torch.equal(explicit.generation_pass(x, t).velocity, want)
    m.skip_unused = True  # the skipped last layer: same values up to rounding
    torch.testing.assert_close(m.generation_pass(x, t).velocity, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_non_mmsa_layers_get_no_cross_switches(monkeypatch, skip):
    m = tiny(mmsa_layers=[2])
    m.skip_unused = skip
    spy = Spy(monkeypatch)
    x = torch.randn(2, 3, S, S)
    m.generation_pass(x, torch.rand(2))
    assert [c[:2] for c in spy.calls] == [(False, False), (True, True), (False, False)]
    if skip:  # D is read in layer 2 only: full in layer 1, keys only in layer 2, absent in layer 3
        assert [c[2] for c in spy.calls] == [(True, True, True, True), (True, True, False, True),
                                             (True, True, False, False)]
    spy.calls.clear()
    m.detection_pass(x)
    assert [c[:2] for c in spy.calls] == [(False, False), (True, True), (False, False)]
    if skip:  # G likewise
        assert [c[2] for c in spy.calls] == [(True, True, True, True), (False, True, True, True),
                                             (False, False, True, True)]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("layers", [(), "none"])
def test_no_mmsa_layer_means_generation_ignores_the_detector(layers, skip):
    m = tiny(mmsa_layers=layers)
    m.skip_unused = skip
    x, t = torch.randn(2, 3, S, S), torch.rand(2)
    v = m.generation_pass(x, t).velocity
    with torch.no_grad():  # perturb everything the detector stream is made of
        for name, p in m.named_parameters():
            if m.param_owner(name) == "det":
                p.add_(torch.randn_like(p))
    v2 = m.generation_pass(x, t).velocity
    assert torch.equal(v, v2)
    v2.square().sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if m.param_owner(n) == "det")


@pytest.mark.parametrize("skip", [False, True])
def test_detector_reaches_generation_only_through_mmsa_layers(skip):
    """mmsa_layers = [2] of 3: G reads D's keys in layer 2 only, so D's layer-1 weights matter, D's
    output projection and MLP of layer 2 and all of layer 3 do not."""
    m = tiny(mmsa_layers=[2])
    m.skip_unused = skip
    x, t = torch.randn(2, 3, S, S), torch.rand(2)
    v = m.generation_pass(x, t).velocity
    d2, d3 = m.blocks[1].experts["d"], m.blocks[2].experts["d"]
    with torch.no_grad():
        for p in [d2.out.weight, d2.mlp_norm, d2.gate_up.weight, d2.down.weight, *d3.parameters()]:
            p.add_(torch.randn_like(p))
    assert torch.equal(m.generation_pass(x, t).velocity, v)
    with torch.no_grad():
        m.blocks[0].experts["d"].gate_up.weight.mul_(2.0)
    assert not torch.allclose(m.generation_pass(x, t).velocity, v)


# ----------------------------------------------------------------------------- skipped work


def _loss_and_grads(m, run, seed=5):
    """Outputs of run(m) and the gradient of every parameter (zeros where none arrives) of a random
    linear function of them."""
    m.zero_grad(set_to_none=True)
    outs = [o for o in run(m) if o is not None]
    g = torch.Generator().manual_seed(seed)
    sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    return [o.detach() for o in outs], grads


RUNS = {
    "gen": lambda m, x, t: m.generation_pass(x, t, capture_layer=2),
    "gen_constant_detector": lambda m, x, t: m.generation_pass(x, t, constant_detector=True),
    "det": lambda m, x, t: m.detection_pass(x, capture_layer=2)[:2],
    "det_teacher": lambda m, x, t: m.detection_pass(x, capture_layer=2, features_only=True)[:2],
}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("cfg", [dict(), dict(mmsa_layers=[1, 2]), dict(mmsa_layers=[3], d_causal=True),
                                 dict(experts="shared"), dict(kv_heads=2, g_causal=True), dict(g2d=False)])
def test_skipping_matches_the_full_model(run, cfg):
    """Outputs equal up to rounding, and the gradient of every parameter (the unused stream's k/v
    projections of its last needed layer included) matches the model that computes both streams."""
    m = tiny(**cfg)
    x, t = torch.randn(2, 3, S, S), torch.rand(2)
    fn = lambda model: RUNS[run](model, x, t)  # noqa: E731
    m.skip_unused = False
    want, want_grads = _loss_and_grads(m, fn)
    m.skip_unused = True
    got, got_grads = _loss_and_grads(m, fn)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_unused_stream_skips_queries_and_mlp(monkeypatch):
    """Default 3 layers: the generation pass runs D's last layer as keys only (5 of 6 MLPs), the
    detection pass G's, the teacher pass (capture layer 2) G's layer 2 and no layer 3."""
    m = tiny()
    spy = Spy(monkeypatch)
    mlps = []
    real_swiglu = ops.swiglu
    monkeypatch.setattr(ops, "swiglu", lambda x, *a, **k: mlps.append(x.shape) or real_swiglu(x, *a, **k))
    x = torch.randn(2, 3, S, S)
    m.generation_pass(x, torch.rand(2))
    assert [c[2] for c in spy.calls] == [(True, True, True, True)] * 2 + [(True, True, False, True)]
    assert len(mlps) == 5
    spy.calls.clear(), mlps.clear()
    m.detection_pass(x)
    assert [c[2] for c in spy.calls] == [(True, True, True, True)] * 2 + [(False, True, True, True)]
    assert len(mlps) == 5
    spy.calls.clear(), mlps.clear()
    m.detection_pass(x, capture_layer=2, features_only=True)
    assert [c[2] for c in spy.calls] == [(True, True, True, True), (False, True, True, True)]
    assert len(mlps) == 3
