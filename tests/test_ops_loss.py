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
    f64 = dict(dtype=torch.float64)
    y, w, t = torch.rand(5, **f64), torch.rand(5, **f64), torch.randn(3, 4, **f64)
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


# ----------------------------------------------------------------------------- triton backend
# The fused kernel (kernels/loss.py) runs here under the Triton interpreter (conftest sets
# TRITON_INTERPRET=1) on CPU tensors, or compiled for the GPU on CUDA tensors where a CUDA device is
# present (the compiled backend refuses CPU tensors). Oracle: the reference in float64 on the same
# (rounded) inputs.

from unigendet import backends  # noqa: E402
from unigendet.ops.loss import OP, _triton_auto_check, _triton_check, _triton_impl  # noqa: E402
from unigendet.ops.reference import bce_diga_loss_ref  # noqa: E402

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton tests put their inputs

# (dtype, atol, rtol) for fp32; fp16/bf16 use the 2x-eager rule below (docs/design.md §4.3)
TOL = [(torch.float32, 1e-5, 1e-5), (torch.float16, None, None), (torch.bfloat16, None, None)]


def make_loss_inputs(N, M, C, dtype=torch.float32, seed=0, scale=5.0, device=DEV):
    """Drawn on the CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, generator=g) * scale).to(device=device, dtype=dtype)
    y = torch.rand(N, generator=g).to(device=device, dtype=dtype)   # soft labels
    w = torch.rand(N, generator=g).to(device=device, dtype=dtype)
    s = torch.randn(M, C, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(M, C, generator=g).to(device=device, dtype=dtype)
    return z, y, w, s, t


def run_loss(fn, z, y, w, s, t, w_align=0.7, upcast=False, mult=(1.0, 0.0, 0.0)):
    """(total, bce, align, dz, ds) in float64; backprop mult[0]*total + mult[1]*bce + mult[2]*align."""
    cast = (lambda x: x.double()) if upcast else (lambda x: x)
    zz = None if z is None else cast(z).detach().requires_grad_()
    ss = None if s is None else cast(s).detach().requires_grad_()
    parts = fn(zz, None if y is None else cast(y), None if w is None else cast(w), ss,
               None if t is None else cast(t), w_align=w_align)
    loss = sum(m * p for m, p in zip(mult, parts))
    leaves = [x for x in (zz, ss) if x is not None]
    grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
    dz = grads.pop(0) if zz is not None else None
    ds = grads.pop(0) if ss is not None else None
    return [None if x is None else x.detach().double() for x in (*parts, dz, ds)]


def triton_loss(*args, **kwargs):
    return ops.bce_diga_loss(*args, backend="triton", **kwargs)


def eager_loss(z, y, w, s, t, w_align):
    """Plain eager PyTorch in the inputs' dtype (the 2x rule's yardstick)."""
    bce = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() / w.sum().clamp_min(1e-12)
    align = (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    return bce + w_align * align, bce, align


def assert_match_ref(got, want, atol=1e-5, rtol=1e-5):
    for name, a, b in zip(("total", "bce", "align", "d_logits", "d_student"), got, want):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("N,M,C", [(1, 1, 129), (333, 1037, 129), (17, 5, 1024), (1, 3, 9000)])
def test_triton_parts_and_grads_match_reference(N, M, C):
    """Odd sizes; C=9000 > 8192 takes the chunked two-pass path."""
    inputs = make_loss_inputs(N, M, C, seed=N + M + C)
    assert_match_ref(run_loss(triton_loss, *inputs), run_loss(bce_diga_loss_ref, *inputs, upcast=True))


def test_triton_large_row_block_m1037_c1024_n333():
    """The biggest required shape once, fp32, with a non-contiguous teacher (row stride 2C)."""
    z, y, w, s, _ = make_loss_inputs(333, 1037, 1024, seed=3)
    t = torch.randn(1037, 2048, generator=torch.Generator().manual_seed(4)).to(DEV)[:, 1024:]
    assert not t.is_contiguous()
    assert_match_ref(run_loss(triton_loss, z, y, w, s, t), run_loss(bce_diga_loss_ref, z, y, w, s, t, upcast=True))


@pytest.mark.parametrize("dtype,atol,rtol", TOL)
@pytest.mark.parametrize("mult", [(1.0, 0.0, 0.0), (3.0, 0.5, 2.0)], ids=["total", "mixed"])
def test_triton_dtypes(dtype, atol, rtol, mult):
    """fp32 within (atol, rtol); fp16/bf16: |ours - ref64| <= 2 |eager - ref64| + floor, per output.

    `mixed` backpropagates 3*total + 0.5*bce + 2*align: the stored gradients are rescaled in backward."""
    inputs = make_loss_inputs(333, 129, 129, dtype=dtype, seed=7)
    ours = run_loss(triton_loss, *inputs, mult=mult)
    ref = run_loss(bce_diga_loss_ref, *inputs, upcast=True, mult=mult)
    if dtype == torch.float32:
        assert_match_ref(ours, ref, atol, rtol)
        return
    eager = run_loss(eager_loss, *inputs, mult=mult)
    for name, o, e, r in zip(("total", "bce", "align", "d_logits", "d_student"), ours, eager, ref):
        err, err_eager = (o - r).abs().max().item(), (e - r).abs().max().item()
        assert err <= 2 * err_eager + 1e-6 * max(1.0, r.abs().max().item()), (name, err, err_eager)
    assert ours[3] is not None and ours[4] is not None


def test_triton_mixed_input_dtypes():
    """Under autocast the projector output (student) is bf16 while logits/teacher may be fp32."""
    z, y, w, s, t = make_loss_inputs(33, 17, 129, seed=12)
    s = s.to(torch.bfloat16)
    ours, ref = run_loss(triton_loss, z, y, w, s, t), run_loss(bce_diga_loss_ref, z, y, w, s, t, upcast=True)
    assert_match_ref(ours[:4], ref[:4])
    torch.testing.assert_close(ours[4], ref[4], atol=1e-6, rtol=1e-2)  # d_student is bf16


def test_triton_extreme_logits_zero_weights_zero_and_tiny_vectors():
    z = torch.tensor([100.0, -100.0, 100.0, -100.0, 0.0, 3.0], device=DEV)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.3], device=DEV)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], device=DEV)
    s = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(DEV)
    t = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(DEV)
    s[0] = 0.0          # zero student: cos = 0, the norm clamp is constant
    t[1] = 0.0          # zero teacher
    s[2], t[2] = 0.0, 0.0
    s[3] *= 1e-10       # below eps = 1e-8: clamped, gradient through the clamp is zero
    got = run_loss(triton_loss, z, y, w, s, t)
    assert all(torch.isfinite(x).all() for x in got)
    assert_match_ref(got, run_loss(bce_diga_loss_ref, z, y, w, s, t, upcast=True), atol=1e-5, rtol=1e-5)
    assert got[3][4] == 0 and got[3][5] == 0  # zero weight, zero gradient
    torch.testing.assert_close(got[1], torch.tensor(50.0, dtype=torch.float64, device=DEV))
    zero_w = run_loss(triton_loss, z, y, torch.zeros(6, device=DEV), s, t)  # sum(w) = 0: bce = 0, dz = 0
    assert zero_w[1] == 0 and (zero_w[3] == 0).all() and torch.isfinite(zero_w[0])


def test_triton_none_parts_and_w_align_zero():
    z, y, w, s, t = make_loss_inputs(9, 6, 33, seed=2)
    for args in ((z, y, w, None, None), (None, None, None, s, t)):
        assert_match_ref(run_loss(triton_loss, *args), run_loss(bce_diga_loss_ref, *args, upcast=True))
    # w_align = 0: the stored gradient cannot fold w_align; backprop through align must still work
    for mult in ((1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 0.0)):
        got = run_loss(triton_loss, z, y, w, s, t, w_align=0.0, mult=mult)
        assert_match_ref(got, run_loss(bce_diga_loss_ref, z, y, w, s, t, w_align=0.0, upcast=True, mult=mult))


def test_triton_teacher_gets_no_grad_and_no_grad_mode():
    z, y, w, s, t = make_loss_inputs(4, 3, 5, seed=5)
    s.requires_grad_()
    t.requires_grad_()
    parts = triton_loss(z, y, w, s, t)
    parts.total.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():  # forward only: no gradient buffers are written
        again = triton_loss(z, y, w, s, t)
    assert not again.total.requires_grad
    assert torch.equal(again.total, parts.total.detach())


def test_triton_is_deterministic():
    inputs = make_loss_inputs(333, 300, 129, dtype=torch.bfloat16, seed=11)
    a = run_loss(triton_loss, *inputs, mult=(2.0, 1.0, 0.0))
    b = run_loss(triton_loss, *inputs, mult=(2.0, 1.0, 0.0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_triton_second_backward_raises():
    z, y, w, s, t = make_loss_inputs(4, 3, 5, seed=6)
    s.requires_grad_()
    parts = triton_loss(z, y, w, s, t)
    parts.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        parts.total.backward()


def test_triton_backend_selection(monkeypatch):
    z, y, w, s, t = make_loss_inputs(4, 3, 5)
    assert _triton_check(z, y, w, s, t) is None  # interpreter on (CPU), or compiled (CUDA)
    if DEV == "cpu":
        assert "slow" in _triton_auto_check(z, y, w, s, t)  # ... but auto keeps the reference on CPU
        assert backends.select(OP, "auto", z, y, w, s, t) is bce_diga_loss_ref
    else:  # compiled kernels on CUDA tensors: auto takes them
        assert _triton_auto_check(z, y, w, s, t) is None
        assert backends.select(OP, "auto", z, y, w, s, t) is _triton_impl
    assert "float64" in _triton_check(z.double(), y, w, s, t)
    with pytest.raises(ops.BackendError, match="float64"):
        ops.bce_diga_loss(z, y, w, s.double(), t.double(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = [x.cpu() for x in (z, y, w, s, t)]
    assert "TRITON_INTERPRET" in _triton_check(*cpu)  # CPU tensors need the interpreter
    if not torch.cuda.is_available():
        assert _triton_check() is not None


def test_triton_custom_op_opcheck():
    """Schema, fake (meta) and autograd registrations of the torch.library ops are consistent."""
    import unigendet.kernels.loss  # noqa: F401  (registers the ops; otherwise imported on first use)

    z, y, w, s, t = make_loss_inputs(5, 4, 33, seed=8)
    z.requires_grad_()
    s.requires_grad_()
    torch.library.opcheck(torch.ops.unigendet.bce_diga_loss_fwd, (z, y, w, s, t, 0.7, 1e-8, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, g_z, g_s = torch.ops.unigendet.bce_diga_loss_fwd(z.detach(), y, w, s.detach(), t, 0.7, 1e-8, True, True)
    torch.library.opcheck(torch.ops.unigendet.bce_diga_loss_bwd_,
                          (out, g_z, g_s, torch.tensor([2.0, 0.0, 1.0, 0.0], device=DEV), torch.float32, 1.0, 1.0, 1.0),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_under_torch_compile_without_graph_breaks():
    """fullgraph=True: the custom op (forward, fake, autograd, in-place backward scale) traces as one
    node. aot_eager keeps this fast on CPU; inductor also works but compiles for ~25 s here."""
    z, y, w, s, t = make_loss_inputs(7, 5, 33, seed=9)

    def loss(fn, z, y, w, s, t):
        parts = fn(z, y, w, s, t, w_align=0.7)
        return 2 * parts.total + parts.align

    compiled = torch.compile(lambda *a: loss(triton_loss, *a), backend="aot_eager", fullgraph=True)
    zz, ss = z.clone().requires_grad_(), s.clone().requires_grad_()
    out = compiled(zz, y, w, ss, t)
    got = [out, *torch.autograd.grad(out, [zz, ss])]
    zz, ss = z.clone().requires_grad_(), s.clone().requires_grad_()
    out = loss(bce_diga_loss_ref, zz, y, w, ss, t)
    for a, b in zip(got, [out, *torch.autograd.grad(out, [zz, ss])]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_triton_trainer_matches_reference(tiny_overrides, tmp_path, monkeypatch):
    """3 joint steps of the tiny config with bce_diga_loss on triton (other ops on the reference,
    they have no triton backend) log the same losses as an all-reference run."""
    import json

    from unigendet import load_config
    from unigendet.train import Trainer

    real_select = backends.select
    calls = []

    def run(backend, out):
        def select(op, requested, *args, **kwargs):
            if op == OP:
                calls.append(backend)
                requested = backend
            return real_select(op, requested, *args, **kwargs)

        monkeypatch.setattr(backends, "select", select)
        cfg = load_config("tiny_cpu", tiny_overrides + [
            "--train.steps=3", "--train.save_every=3", "--train.log_every=1", "--phases.mode=joint",
            f"--train.out_dir={tmp_path / out}"])
        Trainer(cfg, log=lambda *_: None).train()
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    ref, tri = run("reference", "ref"), run("triton", "tri")
    assert "triton" in calls and len(ref) == len(tri) == 3
    for a, b in zip(ref, tri):
        for key in ("joint/flow", "joint/bce", "joint/align", "joint/auth"):
            assert key in a
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
