"""CUDA graphs of the trainer (engine/train/graphs.py). On CPU: the graph-safety of the step that the
graphs capture (no host reads, static storage), the runner's warm-up / capture / replay logic, and the
refusals. On a GPU: captured training equals eager training, and replays never sync with the host."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from op_testing import gpu_only
from unigendet import load_config
from unigendet.train import Trainer, TrainingError
from unigendet.train.graphs import DeviceSums, StepGraphs


def quiet_trainer(overrides, extra=()):
    return Trainer(load_config("tiny_cpu", overrides + list(extra)), log=lambda *_: None)


@contextlib.contextmanager
def host_reads_forbidden():
    """Every way a tensor's value reaches the host raises: what a CUDA-graph capture cannot contain.
    Python's readers are patched; ATen's own (`_local_scalar_dense`, e.g. inside an op that takes a
    0-d tensor as a Scalar, as _foreach_lerp_ does) are caught by a dispatch mode."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("the step read a tensor value on the host")

    class NoScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError(f"the step read a tensor value on the host (in ATen: {func})")
            return func(*args, **(kwargs or {}))

    names = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        with NoScalarReads():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_captured_step_never_reads_the_device(tiny_overrides):
    """What `train.cuda_graphs` captures (each phase's step and the steady-state pool refill) runs here
    with every host read of a tensor forbidden: there is no sync to break a capture."""
    t = quiet_trainer(tiny_overrides, ["--train.steps=8", "--phases.refill_every=2", "--model.num_classes=0"])
    from unigendet.train import PHASES, set_trainable

    t.step()  # the first steps fill the pool and create the loss sums and the optimizer state
    t.step()
    for _ in range(2):
        t.inputs.load(next(t._data_iter))
        for name in ("gen", "det"):
            set_trainable(t.model, PHASES[name])
            with host_reads_forbidden():
                parts = t._phase_step(PHASES[name])
                t._refill(t.cfg.phases.refill_count)
            assert set(parts) >= {"total"}
    assert t.skipped_steps == 0
    with host_reads_forbidden(), pytest.raises(AssertionError, match="read a tensor value"):
        t.skipped_steps  # the guard does catch a host read


def test_step_storage_is_static(tiny_overrides):
    """Everything a captured step reads or writes across steps keeps its storage: inputs, pool and its
    write position, EMA counter, skip counters, loss sums, optimizer state and learning rates."""
    t = quiet_trainer(tiny_overrides, ["--train.steps=12", "--phases.refill_every=3"])

    def storage():
        tensors = {"images": t.inputs.images, "is_fake": t.inputs.is_fake, "class_ids": t.inputs.class_ids,
                   "pool": t.pool.images, "pool_ptr": t.pool._ptr, "pool_written": t.pool._written,
                   "pool_now": t.pool._now, "ema_updates": t.ema._updates,
                   "bad_run": t._bad_run, "skipped": t._skipped, **t.sums.sums}
        for k, state in enumerate(t.optimizer.state.values()):
            tensors.update({f"adam{k}/{name}": v for name, v in state.items() if torch.is_tensor(v)})
        return {name: v.data_ptr() for name, v in tensors.items()}

    for _ in range(2):  # one step per phase: every buffer exists
        t.step()
    before = storage()
    for _ in range(7):
        t.step()
    assert storage() == before


def test_device_sums_mean_and_reset():
    sums = DeviceSums("cpu")
    for step in range(3):
        sums.add("gen", {"flow": torch.tensor(float(step)), "total": torch.tensor(1.0)})
        sums.count("gen")
    sums.add("det", {"bce": torch.tensor(4.0)})
    sums.count("det")
    storage = {k: v.data_ptr() for k, v in sums.sums.items()}
    means = {k: float(v) for k, v in sums.means().items()}
    assert means == {"gen/flow": 1.0, "gen/total": 1.0, "det/bce": 4.0}
    assert all(float(v) == 0 for v in sums.sums.values()) and sums.means() == {}
    sums.add("det", {"bce": torch.tensor(2.0)})
    sums.count("det")
    assert {k: float(v) for k, v in sums.means().items()} == {"det/bce": 2.0}
    assert {k: v.data_ptr() for k, v in sums.sums.items()} == storage  # reset in place


def test_step_graphs_warm_up_capture_once_then_replay(monkeypatch):
    """The runner's logic with a stand-in for torch.cuda's graph API: `warmup` eager calls per key,
    one capture (whose replay is that call's work), replays only afterwards; keys are independent."""
    log, runs = [], []

    class FakeGraph:
        def register_generator_state(self, generator):
            log.append(("register", generator))

        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def fake_capture(graph):
        log.append("capture")
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(StepGraphs, "_on_side_stream", staticmethod(lambda fn: (log.append("warmup"), fn())[1]))
    graphs = StepGraphs(True, warmup=2, generators=("noise",))

    def step(key):
        return graphs.run(key, lambda: runs.append(key) or {"out": key})

    outputs = [step("gen") for _ in range(5)]
    assert outputs == [{"out": "gen"}] * 5  # replays hand back the captured call's (static) outputs
    assert log == ["warmup", "warmup", ("register", "noise"), "capture", "replay", "replay", "replay"]
    assert runs == ["gen"] * 3  # 2 warm-up calls + the one traced by the capture; replays run no Python
    assert graphs.captured("gen") and not graphs.captured("det")
    step("det")
    assert log[-1] == "warmup" and graphs.calls["det"] == 1 and runs[-1] == "det"


def test_cuda_graphs_are_refused_where_they_cannot_run(tiny_overrides):
    with pytest.raises(TrainingError, match="train.cuda_graphs = true needs a CUDA device"):
        quiet_trainer(tiny_overrides, ["--train.cuda_graphs=true", "--train.device=cpu"])
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        if not torch.cuda.is_available():
            StepGraphs(True)
        else:
            raise RuntimeError("CUDA graphs need a CUDA device")  # the refusal only exists without one


# ---------------------------------------------------------------------------------------------- GPU

GPU_RUN = ["--train.device=cuda", "--train.steps=24", "--phases.refill_every=4", "--train.log_every=4",
           "--train.save_every=24", "--data.loader=pil"]


@gpu_only
def test_cuda_graph_training_matches_eager(tiny_overrides, tmp_path):
    def run(graphs: bool):
        t = quiet_trainer(tiny_overrides, GPU_RUN + [f"--train.cuda_graphs={graphs}",
                                                     f"--train.out_dir={tmp_path / str(graphs)}"])
        last = t.train()
        return t, last

    eager, eager_last = run(False)
    graphed, graphed_last = run(True)
    assert set(graphed.graphs.graphs) == {"gen", "det", "refill"}
    for key in ("gen/flow", "det/bce"):
        assert graphed_last[key] == pytest.approx(eager_last[key], rel=0.05, abs=0.02), key
    for p, q in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0.05, atol=5e-3)


@gpu_only
def test_graph_replays_never_sync(tiny_overrides, tmp_path):
    t = quiet_trainer(tiny_overrides, GPU_RUN + ["--train.cuda_graphs=true", f"--train.out_dir={tmp_path}"])
    for _ in range(20):  # warm-up and capture of both phases (steps 6, 7) and of the refill (step 16)
        t.step()
    assert set(t.graphs.graphs) == {"gen", "det", "refill"}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            t.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    t.check_health()
    assert t.skipped_steps == 0
