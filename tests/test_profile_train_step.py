"""bench/profile_train_step.py: the per-category breakdown of a train step covers the step's time,
attributes the backward of each labelled call to its category, and counts the refill when one runs."""
import pytest

import bench.common
from bench import profile_train_step

TINY = ["--model.width=32", "--model.depth=1", "--model.heads=2", "--model.kv_heads=1", "--model.align_layer=1",
        "--model.projector_hidden=16", "--train.batch_size=8", "--phases.pool_size=8", "--phases.refill_count=8",
        "--phases.sampler_steps=2", "--phases.refill_every=2"]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_breakdown_covers_the_step(tmp_path, monkeypatch, backend):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    rows = profile_train_step.main(["--steps", "2", "--warmup", "1", "--threads", "1", "--backend", backend, *TINY])
    by = {r["category"]: r for r in rows}
    assert list(by)[:-1] == profile_train_step.ORDER
    total = by.pop("total (profiled wall)")
    assert sum(r["ms_per_step"] for r in by.values()) == pytest.approx(total["ms_per_step"], rel=1e-6)
    for cat in ("attention", "backbone: linear", "backbone: rmsnorm", "backbone: swiglu", "losses", "pool refill",
                "optimizer + EMA", "data"):
        assert by[cat]["ms_per_step"] > 0, cat
    assert (next(tmp_path.iterdir()) / "profile_train_step.csv").exists()


def test_backward_ops_go_to_their_forward_category():
    """An autograd node's ops count for the labelled forward call that created the node."""
    import torch
    from torch.profiler import profile, record_function

    x = torch.randn(64, 64, requires_grad=True)
    with profile() as prof:
        with record_function(profile_train_step.LABEL + "attention"):
            y = torch.softmax(x @ x, -1)
        with record_function(profile_train_step.LABEL + "losses"):
            loss = y.square().sum()
        loss.backward()
    totals = profile_train_step.categorise(prof.events())
    assert totals["attention"] > 0 and totals["losses"] > 0
    # the matmul's and softmax's backward (two 64^3 matmuls and more) would land in "other" if unattributed
    assert totals.get("other tensor ops", 0.0) < 0.25 * totals["attention"], totals


def test_an_op_without_grad_does_not_take_the_next_nodes_backward():
    """Ops under no_grad record the sequence number the next autograd node will take: the node's backward
    still counts for the op that created it (the refill and the DIGA teacher run without grad)."""
    import torch
    from torch.profiler import profile, record_function

    x = torch.randn(256, 256, requires_grad=True)
    with profile() as prof:
        with record_function(profile_train_step.LABEL + "pool refill"), torch.no_grad():
            x.mul(2.0)
        with record_function(profile_train_step.LABEL + "attention"):
            y = torch.softmax(x @ x, -1)
        y.square().sum().backward()
    totals = profile_train_step.categorise(prof.events())
    assert totals.get("pool refill", 0.0) < 0.25 * totals["attention"], totals
