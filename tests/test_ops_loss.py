"""bce_diga_loss (reference backend) against direct PyTorch formulas, and the loss combiner."""
import pytest
import torch
import torch.nn.functional as F

from unigendet import ops
from unigendet.losses import BCEGroup, combined_bce_align, flow_loss, one_step_estimate, sample_flow_inputs


def direct(logits, targets, weights, student, teacher, w_align):
    per = F.binary_cross_entropy_with_logits(logits.double(), targets.double(), reduction="none")
    bce = (weights.double() * per).sum() / weights.double().sum().clamp_min(1e-12)
    align = (1 - F.cosine_similarity(student.double(), teacher.double(), dim=-1, eps=1e-8)).mean()
    return bce + w_align * align, bce, align


@pytest.mark.parametrize("N,M,C", [(1, 1, 129), (333, 1037, 24), (17, 5, 1024)])
def test_parts_match_direct_formula(N, M, C):
    g = torch.Generator().manual_seed(N + M)
    logits = torch.randn(N, generator=g) * 5
    targets = torch.rand(N, generator=g)  # soft labels
    weights = torch.rand(N, generator=g)
    student, teacher = torch.randn(M, C, generator=g), torch.randn(M, C, generator=g)
    parts = ops.bce_diga_loss(logits, targets, weights, student, teacher, w_align=0.7)
    for got, want in zip(parts, direct(logits, targets, weights, student, teacher, 0.7)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert got.dtype == torch.float32


def test_extreme_logits_zero_weights_zero_vectors_are_finite():
    logits = torch.tensor([100.0, -100.0, 0.0], requires_grad=True)
    targets = torch.tensor([0.0, 1.0, 1.0])
    weights = torch.tensor([1.0, 1.0, 0.0])
    student = torch.zeros(3, 8, requires_grad=True)
    teacher = torch.randn(3, 8)
    parts = ops.bce_diga_loss(logits, targets, weights, student, teacher)
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.allclose(parts.bce, torch.tensor(100.0))
    assert torch.allclose(parts.align, torch.tensor(1.0))  # cos with a zero vector is 0
    assert torch.isfinite(logits.grad).all() and torch.isfinite(student.grad).all()
    assert logits.grad[2] == 0  # zero weight, zero gradient
    zero_w = ops.bce_diga_loss(logits, targets, torch.zeros(3), None, None)
    assert zero_w.bce == 0 and torch.isfinite(zero_w.total)


def test_none_inputs_and_teacher_gets_no_gradient():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    parts = ops.bce_diga_loss(None, None, None, s, t, w_align=2.0)
    assert parts.bce == 0 and torch.allclose(parts.total, 2 * parts.align)
    parts.total.backward()
    assert s.grad is not None and t.grad is None
    z = torch.randn(5)
    only_bce = ops.bce_diga_loss(z, torch.ones(5), torch.ones(5), None, None)
    assert only_bce.align == 0 and torch.allclose(only_bce.total, only_bce.bce)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y, w, t = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z, s: ops.bce_diga_loss(z, y, w, s, t, backend="reference").total, (z, s))


@pytest.mark.parametrize("bad", ["shape", "missing_targets", "teacher_only", "nothing"])
def test_bad_inputs(bad):
    z, y, w, s, t = torch.randn(4), torch.ones(4), torch.ones(4), torch.randn(2, 3), torch.randn(2, 3)
    args = {"shape": (z, y[:3], w, s, t), "missing_targets": (z, None, w, s, t),
            "teacher_only": (None, None, None, None, t), "nothing": (None, None, None, None, None)}[bad]
    with pytest.raises(ValueError, match="bce_diga_loss"):
        ops.bce_diga_loss(*args)


def test_combined_groups_equal_the_weighted_sum_of_means():
    """One op call over all groups equals sum_g weight_g * mean BCE(g) + align_weight * align."""
    g = torch.Generator().manual_seed(1)
    det = BCEGroup("bce", torch.randn(10, generator=g), (torch.rand(10, generator=g) > 0.5).float(), 1.0)
    auth = BCEGroup("auth", torch.randn(6, generator=g), torch.zeros(6), 0.3)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    terms = combined_bce_align([det, auth], s, t, 0.8)
    want = (F.binary_cross_entropy_with_logits(det.logits, det.targets)
            + 0.3 * F.binary_cross_entropy_with_logits(auth.logits, auth.targets)
            + 0.8 * (1 - F.cosine_similarity(s, t, dim=-1)).mean())
    torch.testing.assert_close(terms.total, want)
    assert set(terms.parts) == {"bce", "auth", "align"}


def test_flow_inputs_and_one_step_estimate():
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    x_t, t, eps = sample_flow_inputs(x0, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    v_true = eps - x0  # the exact velocity: the loss is 0 and one step lands on x0
    assert flow_loss(v_true, x0, eps) < 1e-12
    torch.testing.assert_close(one_step_estimate(x_t, t, v_true), x0, atol=1e-5, rtol=1e-5)
