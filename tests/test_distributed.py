"""Training across processes: 2 gloo ranks under torchrun (data parallel and FSDP2) against one
process with the same global batch, and resuming across the two."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from unigendet import load_config
from unigendet.rng import ShardedGenerator, batch_randn
from unigendet.train import Trainer, TrainingError, list_checkpoints
from unigendet.train.distributed import GradientBuckets

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = ["--train.steps=4", "--train.save_every=2", "--train.log_every=1", "--phases.k=1"]


def test_sharded_draws_are_the_global_draws_split_like_the_loader():
    """Rank r's rows of a batch draw are rows r::world of the single-process draw of the global batch."""
    single = batch_randn((6, 3), torch.Generator().manual_seed(5), device="cpu")
    for rank in range(2):
        shard = batch_randn((3, 3), ShardedGenerator(torch.Generator().manual_seed(5), rank, 2), device="cpu")
        assert torch.equal(shard, single[rank::2])


def test_gradient_buckets_go_out_during_backward_skip_unused_and_catch_late_gradients():
    """One gloo rank (the all-reduce is the identity, so the stored gradients must be the plain ones:
    a bucket written back at the wrong offsets would swap them). One parameter per bucket; bucket
    order is reverse model order: [c], [b], [a]."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(300)) for _ in range(3))
        buckets = GradientBuckets([a, b, c], world_size=1, bucket_mb=1500 / 2**20)

        def step(loss_of):
            for p in (a, b, c):
                p.grad = None
            ref = torch.autograd.grad(loss_of(), [a, b, c], allow_unused=True)
            buckets.begin()
            loss_of().backward()
            out_during_backward = buckets._next
            buckets.finish()
            for p, g in zip((a, b, c), ref):
                assert (p.grad is None) if g is None else torch.equal(p.grad, g)
            return out_during_backward

        without_c = lambda: (a * a).sum() + (b.sin() * a).sum()  # noqa: E731
        with_c = lambda: without_c() + (c * b).sum()  # noqa: E731
        assert step(without_c) == 0  # c requires grad, gets none: its bucket (first) holds all back
        assert step(without_c) == 3  # learned: every bucket went out while backward ran
        assert step(with_c) == 3  # c's gradient came after its bucket went out: sent in finish
        assert step(with_c) == 3
    finally:
        dist.destroy_process_group()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _common(tiny_overrides) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith(("--train.out_dir", "--train.batch_size"))] + STEPS


def _torchrun_cmd(args: list[str], out: Path, resume: bool = False) -> list[str]:
    """Train on 2 gloo ranks with 4 samples each (the global batch of the single-process runs: 8)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
            *args, "--train.batch_size=4", f"--train.out_dir={out}", *(["--resume"] if resume else [])]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UNIGENDET_BACKEND", None)
    return env


def _torchrun(args: list[str], out: Path, resume: bool = False) -> None:
    proc = subprocess.run(_torchrun_cmd(args, out, resume), capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _single(args: list[str], out: Path, resume: bool = False) -> Trainer:
    trainer = Trainer(load_config("tiny_cpu", args + ["--train.batch_size=8", f"--train.out_dir={out}"]),
                      resume=resume, log=lambda *_: None)
    trainer.train()
    return trainer


def _assert_same_losses(ref: list[dict], got: list[dict], phases=("gen", "det", "gen", "det")) -> None:
    assert [r["phase"] for r in ref] == [r["phase"] for r in got] == list(phases)
    for a, b in zip(ref, got):  # same samples, same noise: the losses agree up to summation order
        for key in a:
            if "/" in key and not key.endswith("grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def _weights(run: Path, step: int, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{which}.safetensors")


def _assert_close_to(trainer: Trainer, weights: dict[str, torch.Tensor]) -> None:
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("bucket_mb, extra", [(25.0, []), (0.01, []), (0.01, ["--loss.w_align=0"])])
def test_two_gloo_ranks_match_one_process_with_the_global_batch(tiny_overrides, tmp_path, bucket_mb, extra):
    """bucket_mb 25: all gradients in one bucket; 0.01: 10-13 buckets of 10 KiB, all-reduced while the
    backward pass runs; with w_align = 0 the projector requires grad in the gen phase but gets none
    (its bucket must not wait for it)."""
    common = _common(tiny_overrides) + extra
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun(common + [f"--train.ddp_bucket_mb={bucket_mb}"], ddp)
    rank0, rank1 = load_file(ddp / "rank0.safetensors"), load_file(ddp / "rank1.safetensors")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # replicas stay bit-identical

    trainer = _single(common, single)
    _assert_same_losses(_metrics(single), _metrics(ddp))
    _assert_close_to(trainer, rank0)
    # rank 0 alone wrote the checkpoints (one folder per save, nothing half-written left)
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


@pytest.mark.slow
def test_fsdp_matches_one_process_resumes_exactly_and_writes_single_process_checkpoints(tiny_overrides, tmp_path):
    """FSDP2 on 2 gloo ranks: the losses and weights of one process with the global batch; 2 steps +
    resume + 2 steps = 4 steps straight, bit for bit; its checkpoint resumes in a single process."""
    common = _common(tiny_overrides) + ["--train.fsdp=true"]
    fsdp, split = tmp_path / "fsdp", tmp_path / "split"
    _torchrun(common, fsdp)
    _torchrun(common + ["--train.steps=2"], split)
    _torchrun(common, split, resume=True)

    for rank in range(2):  # each rank holds about half of the parameters, AdamW moments (2 per element), EMA
        held = json.loads((fsdp / f"rank{rank}.json").read_text())
        full = held["params_full"]
        assert 0.4 * full < held["params"] < 0.6 * full and 0.8 * full < held["moments"] < 1.2 * full
        assert held["ema"] == held["params"]

    single_args = _common(tiny_overrides)
    trainer = _single(single_args, tmp_path / "single")
    _assert_same_losses(_metrics(tmp_path / "single"), _metrics(fsdp))
    _assert_close_to(trainer, _weights(fsdp, 4))
    for which in ("model", "ema"):  # gathered from the shards into full tensors, same names and shapes
        ref, got = _weights(tmp_path / "single", 4, which), _weights(fsdp, 4, which)
        assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in ref.items()}
        assert all(torch.equal(a, b) for a, b in zip(_weights(split, 4, which).values(), got.values())), which
    moments = [torch.load(run / "checkpoints/step_0000004/trainer_state.pt", weights_only=True)["optimizer"]["state"]
               for run in (fsdp, split)]
    assert moments[0].keys() == moments[1].keys()
    for index, state in moments[0].items():
        assert all(torch.equal(state[k], moments[1][index][k]) for k in state), index

    # a single process continues the FSDP run from its step-2 checkpoint like the single run straight
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    shutil.copy(fsdp / ".unigendet_run", resumed)  # a run folder of its own (train refuses any other)
    _assert_close_to(_single(single_args, resumed, resume=True), _weights(tmp_path / "single", 4))


@pytest.mark.slow
def test_fsdp_with_bf16_gathered_parameters_keeps_fp32_masters(tiny_overrides, tmp_path):
    """train.fsdp_param_dtype = bfloat16: the forward/backward run in bf16 (losses near the fp32 run's),
    the shards, moments and checkpoints stay fp32."""
    common = _common(tiny_overrides)
    _torchrun(common + ["--train.fsdp=true", "--train.fsdp_param_dtype=bfloat16"], tmp_path / "bf16")
    _single(common, tmp_path / "fp32")
    ref, got = _metrics(tmp_path / "fp32"), _metrics(tmp_path / "bf16")
    for a, b in zip(ref, got):
        for key in ("gen/flow", "gen/align", "gen/auth", "det/bce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-2), (a["step"], key)
    assert any(a[k] != b[k] for a, b in zip(ref, got) for k in a if "/" in k)  # bf16 did change the numbers
    weights = _weights(tmp_path / "bf16", 4)
    assert all(t.dtype == torch.float32 for t in weights.values())


@pytest.mark.slow
def test_sigterm_to_one_fsdp_rank_stops_every_rank_after_the_same_step(tiny_overrides, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks agree on the step to stop after, save it together
    (a collective gather under FSDP) and exit cleanly; the run then resumes from that step."""
    run = tmp_path / "run"
    args = _common(tiny_overrides) + ["--train.fsdp=true", "--train.save_every=5", "--train.log_every=5"]
    proc = subprocess.Popen(_torchrun_cmd(args + ["--train.steps=100000"], run), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    t0 = time.time()
    while not list_checkpoints(run):
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.kill(int((run.parent / f"{run.name}.pids" / "rank1.pid").read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    # both workers returned 0 long before train.steps, and the newest checkpoint is the stop's
    stopped = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert 5 <= stopped < 100000 and max(r["step"] for r in _metrics(run)) <= stopped

    _torchrun(args + [f"--train.steps={stopped + 2}"], run, resume=True)
    assert list_checkpoints(run)[-1].name == f"step_{stopped + 2:07d}"


@pytest.mark.slow
def test_fsdp_under_torch_compile_gives_the_eager_losses(tiny_overrides, tmp_path):
    """train.compile with FSDP2 (about 2 minutes of inductor compilation on 2 CPU cores): the first
    gen and det steps have the losses of one eager process with the global batch."""
    common = [o for o in _common(tiny_overrides) if not o.startswith("--train.steps")] + ["--train.steps=2"]
    _torchrun(common + ["--train.fsdp=true", "--train.compile=true"], tmp_path / "compiled")
    _single(common, tmp_path / "eager")
    _assert_same_losses(_metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled"), phases=("gen", "det"))


def test_fsdp_without_torchrun_is_refused(tiny_overrides):
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.fsdp=true"])
    with pytest.raises(TrainingError, match="train.fsdp = true shards the model across the processes torchrun"):
        Trainer(cfg, log=lambda *_: None)
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.fsdp_param_dtype=bfloat16"])
    with pytest.raises(TrainingError, match="applies to FSDP only"):
        Trainer(cfg, log=lambda *_: None)
