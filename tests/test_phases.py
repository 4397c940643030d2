"""Phases: which losses each computes, what each trains, and where the DIGA gradients go."""
import pytest
import torch

from unigendet import ModelConfig, UniGenDet
from unigendet.config import LossConfig
from unigendet.losses import flow_loss, sample_flow_inputs
from unigendet.model.unigendet import OWNERS
from unigendet.phase_modes import PHASE_MODES, SCHEDULES, mode_trains_shared, mode_uses_fake_pool, schedule
from unigendet.train import PHASES, phase_at, phase_loss, set_trainable
from unigendet.train.phases import authenticity_logit, frozen_detection_logit


def make_model(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, kv_heads=1, registers=2, align_layer=1,
               projector_hidden=16)
    cfg.update(kw)
    m = UniGenDet(ModelConfig(**cfg))
    torch.nn.init.normal_(m.gen_head.proj.weight, std=0.05)  # so gradients reach every layer
    return m


def batch(B=4, fake_rows=0):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1
    is_fake = torch.zeros(B)
    is_fake[:fake_rows] = 1
    return images, is_fake, torch.full((B,), -1, dtype=torch.long)


def grads_by_owner(model):
    out = {"gen": False, "det": False, "shared": False}
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            out[model.param_owner(name)] = True
    return out


def test_schedule():
    assert [phase_at(s, "alternate", 2).name for s in range(6)] == ["gen", "gen", "det", "det", "gen", "gen"]
    assert phase_at(5, "joint", 1).name == "joint" and phase_at(0, "diga", 1).name == "diga"
    with pytest.raises(ValueError, match=r"phases.mode 'both'; expected one of \('alternate', 'joint', 'diga'\)"):
        phase_at(0, "both", 1)


def test_phase_table_answers_what_the_trainer_and_config_ask():
    """Every mode (a config choice) has a schedule; every phase computes some loss and trains owners the
    model has; which modes keep a fake pool (trainer) and which can train shared experts (config)."""
    assert tuple(SCHEDULES) == PHASE_MODES
    for phase in PHASES.values():
        assert phase.trainable <= set(OWNERS) and (phase.generates or phase.detects), phase
    assert [p.name for p in schedule("alternate")] == ["gen", "det"]
    assert {mode: mode_uses_fake_pool(mode) for mode in PHASE_MODES} == {"alternate": True, "joint": True,
                                                                          "diga": False}
    assert {mode: mode_trains_shared(mode) for mode in PHASE_MODES} == {"alternate": True, "joint": True,
                                                                         "diga": False}
    assert PHASES["joint"].trains_detector and not PHASES["diga"].trains_detector


@pytest.mark.parametrize("phase,parts,trained", [
    ("gen", {"flow", "align", "auth", "total"}, {"gen"}),
    ("det", {"bce", "total"}, {"det"}),
    ("joint", {"flow", "align", "auth", "bce", "total"}, {"gen", "det"}),
    ("diga", {"flow", "align", "auth", "total"}, {"gen"}),
])
def test_phase_terms_and_frozen_experts(phase, parts, trained):
    m = make_model()
    ph = PHASES[phase]
    set_trainable(m, ph)
    images, is_fake, ids = batch()
    fakes = torch.rand(4, 3, 16, 16) * 2 - 1 if ph.detects else None
    terms = phase_loss(m, ph, images, is_fake, ids, fakes, LossConfig(), torch.Generator().manual_seed(0))
    assert set(terms.parts) == parts
    terms.total.backward()
    got = {k for k, v in grads_by_owner(m).items() if v}
    assert got == trained


def test_shared_experts_train_in_gen_and_det_but_not_diga():
    for phase, expect in (("gen", True), ("det", True), ("diga", False)):
        m = make_model(experts="shared")
        set_trainable(m, PHASES[phase])
        ph = PHASES[phase]
        images, is_fake, ids = batch()
        fakes = torch.rand(4, 3, 16, 16) if ph.detects else None
        phase_loss(m, ph, images, is_fake, ids, fakes, LossConfig(), None).total.backward()
        assert grads_by_owner(m)["shared"] is expect, phase


def test_authenticity_gradient_reaches_generator_only_through_x0_hat():
    m = make_model()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    frozen_detection_logit(m, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("layout", [dict(g2d=True, d2g=True), dict(g2d=False, d2g=False)])
def test_frozen_detection_gradient_is_that_of_the_detector_with_detached_weights(layout):
    """The per-row Jacobian of the frozen detector, scaled by the incoming gradient, equals backward
    through the detector with its weights swapped for detached copies (functional_call)."""
    m = make_model(**layout)
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    upstream = torch.tensor([0.7, -1.3, 2.0])
    logit = frozen_detection_logit(m, x)
    (logit * upstream).sum().backward()
    detached = {n: p.detach() for n, p in m.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.func.functional_call(m, (detached, dict(m.named_buffers())), ("det", x_ref)).logit
    (ref * upstream).sum().backward()
    torch.testing.assert_close(logit, ref.detach())
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in m.parameters())


def test_auth_only_and_align_only_and_no_diga():
    m = make_model()
    set_trainable(m, PHASES["gen"])
    images, is_fake, ids = batch()
    for cfg, expected in ((LossConfig(w_align=0.0), {"flow", "auth", "total"}),
                          (LossConfig(w_auth=0.0), {"flow", "align", "total"}),
                          (LossConfig(lambda_dig=0.0), {"flow", "total"})):
        terms = phase_loss(m, PHASES["gen"], images, is_fake, ids, None, cfg, None)
        assert set(terms.parts) == expected
        if cfg.lambda_dig == 0:
            torch.testing.assert_close(terms.total, terms.parts["flow"])


def test_external_fakes_are_detector_positives_and_not_generator_targets():
    m = make_model()
    images, is_fake, ids = batch(B=4, fake_rows=2)
    images[:2] = 50.0  # the external fakes: absurd values that would dominate L_flow if used as x0
    gen = phase_loss(m, PHASES["gen"], images, is_fake, ids, None, LossConfig(lambda_dig=0.0), None)
    assert gen.parts["flow"] < 10
    pool = torch.rand(3, 3, 16, 16)
    det = phase_loss(m, PHASES["det"], images, is_fake, ids, pool, LossConfig(), None)
    logits = m.detection_pass(torch.cat([images, pool])).logit
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 1, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(det.parts["bce"], want)


def test_external_fake_rows_contribute_nothing_to_the_generator_loss():
    """Fake rows stay in the gen batch with weight 0 (static shapes, no host sync): whatever they
    hold, the loss parts and every gradient are those of the real rows alone."""
    results = []
    for fill in (50.0, -3.0):
        m = make_model()
        set_trainable(m, PHASES["gen"])
        images, is_fake, ids = batch(B=4, fake_rows=2)
        images[:2] = fill
        terms = phase_loss(m, PHASES["gen"], images, is_fake, ids, None, LossConfig(w_auth=0.3),
                           torch.Generator().manual_seed(0))
        terms.total.backward()
        results.append((terms.parts, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (parts_a, grads_a), (parts_b, grads_b) = results
    assert set(parts_a) == {"flow", "align", "auth", "total"}
    for k in parts_a:
        torch.testing.assert_close(parts_a[k], parts_b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_real_only_batch_gives_plain_means():
    """Without fakes the weighted forms equal the plain means of docs/design.md §1."""
    from unigendet.losses import flow_loss

    v, x0, eps = torch.randn(3, 5, 3, 4, 4).unbind(0)
    weights = torch.full((5,), 0.2)
    torch.testing.assert_close(flow_loss(v, x0, eps, weights), flow_loss(v, x0, eps))


def _owner_params(model, owner):
    return [(n, p) for n, p in model.named_parameters() if model.param_owner(n) == owner]


@pytest.mark.parametrize("mode,experts", [("joint", "mot"), ("joint", "shared"), ("alternate", "mot"),
                                          ("alternate", "shared"), ("diga", "mot")])  # diga + shared: refused
@pytest.mark.parametrize("g2d", [True, False])
def test_auth_term_never_reaches_detector_weights(mode, experts, g2d):
    """L_auth alone puts exactly zero gradient on every detector-owned parameter, in every phase of
    every mode; the step's other terms still reach the detector where the phase trains it."""
    m = make_model(experts=experts, g2d=g2d)
    images, is_fake, ids = batch()
    det = _owner_params(m, "det")
    for phase in {phase_at(s, mode, 1) for s in range(2)}:
        set_trainable(m, phase)
        if not phase.generates:
            continue
        g = torch.Generator().manual_seed(0)
        x_t, t, eps = sample_flow_inputs(images, g)
        out = m("gen", x_t, t, None)
        logit = authenticity_logit(m, phase, x_t, t, None, out.velocity)
        trained_det = [p for _, p in det if p.requires_grad]
        assert logit.grad_fn is not None  # L_auth trains the generator
        if not trained_det:  # the phase freezes the detector: no gradient of any term reaches it
            assert "det" not in phase.trainable
            continue
        for grad in torch.autograd.grad(logit.sum(), trained_det, allow_unused=True):
            assert grad is None or torch.count_nonzero(grad) == 0
        # the flow term of the same pass reaches the detector expert when the phase trains it and reads it
        if "det" in phase.trainable and g2d:
            flow = flow_loss(out.velocity, images, eps)
            grads = torch.autograd.grad(flow, trained_det, allow_unused=True)
            assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_joint_step_detector_gradient_does_not_depend_on_w_auth():
    """End to end: in a joint g2d step, the detector expert's gradient with w_auth > 0 equals the one
    with w_auth = 0 (up to the rounding of the shared BCE op), while the generator's changes."""
    def grads(w_auth):
        m = make_model(g2d=True)
        set_trainable(m, PHASES["joint"])
        images, is_fake, ids = batch()
        fakes = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
        cfg = LossConfig(w_auth=w_auth, w_align=0.0)
        terms = phase_loss(m, PHASES["joint"], images, is_fake, ids, fakes, cfg, torch.Generator().manual_seed(0))
        terms.total.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, m

    with_auth, m = grads(5.0)
    without, _ = grads(0.0)
    for name in with_auth:
        if m.param_owner(name) == "det":
            torch.testing.assert_close(with_auth[name], without[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(with_auth[n], without[n]) for n in with_auth if m.param_owner(n) == "gen")


def test_bce_not_rescaled_when_batch_holds_no_real_image():
    """A joint step on a batch of external fakes only: the auth rows have weight 0 and must not scale
    the detector BCE by (1 + w_auth)."""
    m = make_model()
    set_trainable(m, PHASES["joint"])
    images, is_fake, ids = batch(B=4, fake_rows=4)
    fakes = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    terms = phase_loss(m, PHASES["joint"], images, is_fake, ids, fakes, LossConfig(w_auth=3.0, w_align=0.0),
                       torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms.total, terms.parts["bce"] + terms.parts["flow"])
    assert terms.parts["auth"] == 0


def test_weight_decay_by_kind():
    """Decay the linear layers' weight matrices wherever they sit (patch projections and timestep MLP
    included); never norms, biases, class embeddings, registers or the stream embedding."""
    from unigendet.train.optim import decayed_parameters

    m = make_model(experts="shared", num_classes=3)
    decayed = decayed_parameters(m)
    names = dict(m.named_parameters())
    assert decayed <= set(names)
    for name in ("gen_embed.proj.weight", "det_embed.proj.weight", "gen_embed.time.mlp.0.weight",
                 "gen_embed.time.mlp.2.weight", "blocks.0.experts.shared.qkv.weight", "projector.0.weight",
                 "gen_head.proj.weight", "det_head.mlp.0.weight"):
        assert name in decayed, name
    for name, p in names.items():
        if name in decayed:
            assert p.ndim == 2 and name.endswith(".weight"), name
        else:  # 1-D scales and biases, or the embedding-like tables
            assert p.ndim == 1 or name in ("gen_embed.classes.weight", "det_embed.registers", "stream_embed"), name
    assert {"gen_embed.classes.weight", "det_embed.registers", "stream_embed"}.isdisjoint(decayed)


def test_mot_layout_has_no_shared_parameter():
    """optim.shared_lr_scale applies to parameters both streams use; the mot layout has none."""
    assert make_model(experts="mot").params_by_owner()["shared"] == []
    assert make_model(experts="shared").params_by_owner()["shared"]
