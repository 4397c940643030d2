"""Backend selection: auto, named, forced by environment, unavailable with reasons."""
import pytest
import torch

from op_testing import NO_EXT
from unigendet import backends, ops


def test_available_backends_reports_reasons():
    table = ops.available_backends(verbose=True)
    assert set(table) == {"mmsa_attention", "mmsa_consistency_loss", "bce_diga_loss", "fused_add_rmsnorm", "swiglu",
                          "qk_rmsnorm_rope"}
    for row in table.values():
        assert row["reference"] == "ok"
        assert all(isinstance(why, str) and why for why in row.values())
    assert ops.available_backends()["swiglu"] == (["reference"] if NO_EXT else ["ext", "reference"])
    assert "sdpa" not in table["swiglu"]  # sdpa is attention's alone


def test_named_unavailable_backend_raises_with_reason():
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(ops.BackendError, match="'sdpa' .* is not available: not implemented for this op"):
        ops.swiglu(q, backend="sdpa")
    if not NO_EXT:
        with pytest.raises(ops.BackendError, match="dtype torch.int64 unsupported"):
            ops.swiglu(torch.ones(2, 4, dtype=torch.int64), backend="ext")
    with pytest.raises(ops.BackendError, match="unknown backend"):
        ops.swiglu(torch.randn(2, 4), backend="cuda-magic")


def test_environment_forces_backend(monkeypatch):
    monkeypatch.setenv("UNIGENDET_BACKEND", "triton")
    with pytest.raises(ops.BackendError, match=r"\$UNIGENDET_BACKEND"):
        ops.mmsa_attention(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), None, None, None)
    monkeypatch.setenv("UNIGENDET_BACKEND", "reference")
    assert ops.swiglu(torch.randn(2, 4), backend="ext").shape == (2, 2)  # the environment wins


def test_default_backend_from_config():
    """A process-wide choice applies to the ops that have that backend; the others choose as for auto."""
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    try:
        ops.set_default_backend("triton")
        with pytest.raises(ops.BackendError, match=r"\(from ops.backend\) cannot run these inputs"):
            ops.mmsa_attention(q, q, q, None, None, None)  # triton exists for attention, not for fp64
        assert ops.swiglu(torch.randn(2, 4)).shape == (2, 2)  # swiglu has no triton backend: auto
        assert ops.swiglu(torch.randn(2, 4), backend="reference").shape == (2, 2)
    finally:
        ops.set_default_backend("auto")
    with pytest.raises(ops.BackendError,
                       match=r"'fastest'; expected one of \('auto', 'triton', 'ext', 'sdpa', 'reference'\)"):
        ops.set_default_backend("fastest")


@pytest.fixture
def toy_op():
    yield "toy_op"
    backends._REGISTRY.pop("toy_op", None)


def test_auto_skips_candidates_that_cannot_run(toy_op):
    calls = []
    backends.register("toy_op", "reference", lambda x: calls.append("reference") or x)
    backends.register("toy_op", "triton", lambda x: calls.append("triton") or x,
                      check=lambda *a, **k: "needs a GPU" if a and a[0].device.type == "cpu" else None)
    backends.select("toy_op", "auto", torch.zeros(1))(torch.zeros(1))
    assert calls == ["reference"]
    assert backends.availability()["toy_op"] == {"triton": "ok", "reference": "ok"}
    with pytest.raises(ops.BackendError, match="needs a GPU"):
        backends.select("toy_op", "triton", torch.zeros(1))


def test_candidates_are_tried_in_the_order_of_the_backend_names(toy_op):
    """BACKEND_NAMES is the order "auto" tries (fused first, the reference last), whatever the order
    of registration; a name outside it is refused."""
    assert backends.BACKEND_NAMES[-1] == "reference"
    for name in ("reference", *backends.BACKEND_NAMES[:-1]):
        backends.register("toy_op", name, lambda x, name=name: name)
    assert list(backends.availability()["toy_op"]) == list(backends.BACKEND_NAMES)
    assert backends.select("toy_op", "auto", torch.zeros(1))(0) == backends.BACKEND_NAMES[0]
    with pytest.raises(ValueError, match=r"unknown backend name 'cuda'; expected one of"):
        backends.register("toy_op", "cuda", lambda x: x)


def test_process_wide_choice_applies_only_on_the_devices_a_backend_implements(toy_op):
    """attention's ext serves CPU tensors only: `ops.backend = "ext"` must leave CUDA inputs on auto
    (Triton) rather than fail; a per-call `backend="ext"` still names it and fails with the reason."""
    backends.register("toy_op", "reference", lambda x: "reference")
    backends.register("toy_op", "ext", lambda x: "ext", devices=("cuda",),
                      check=lambda *a, **k: None if a and a[0].device.type == "cuda" else "CUDA tensors only")
    try:
        ops.set_default_backend("ext")
        assert backends.select("toy_op", "auto", torch.zeros(1))(0) == "reference"  # CPU input: auto
    finally:
        ops.set_default_backend("auto")
    with pytest.raises(ops.BackendError, match="CUDA tensors only"):
        backends.select("toy_op", "ext", torch.zeros(1))


def test_auto_check_keeps_slow_backends_opt_in(toy_op):
    backends.register("toy_op", "reference", lambda x: "reference")
    backends.register("toy_op", "triton", lambda x: "triton", auto_check=lambda *a, **k: "interpreter is slow")
    assert backends.select("toy_op", "auto", torch.zeros(1))(0) == "reference"
    assert backends.select("toy_op", "triton", torch.zeros(1))(0) == "triton"


@pytest.mark.parametrize("version,refuses,broken", [("3.6.0", True, True), ("3.5.1", True, True),
                                                    ("3.6.0", False, False), ("3.7.0", True, False),
                                                    ("3.10.2", True, False), (None, True, False)])
def test_triton_interpreter_incompatibility(version, refuses, broken):
    """Triton <= 3.6's interpreter breaks on NumPy >= 2.4 (seen with torch 2.11's pinned triton 3.6.0)."""
    from unigendet.ops import triton_support

    why = triton_support.interpreter_incompatibility(version, refuses)
    assert (why is not None) == broken
    if broken:
        assert version in why and "triton >= 3.7" in why


def test_interpreter_problem_is_the_reason_on_cpu(monkeypatch):
    from unigendet.ops import triton_support

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_support, "INTERPRETER_PROBLEM", "interpreter broken here")
    assert triton_support.triton_reason([torch.zeros(2)]) == "interpreter broken here"
    with pytest.raises(RuntimeError, match="interpreter broken here"):
        ops.bce_diga_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.zeros(3, 4), torch.zeros(3, 4),
                          backend="triton")
