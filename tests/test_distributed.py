"""Data-parallel training: 2 gloo processes under torchrun against one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unigendet import load_config
from unigendet.rng import ShardedGenerator, batch_randn
from unigendet.train import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_sharded_draws_are_the_global_draws_split_like_the_loader():
    """Rank r's rows of a batch draw are rows r::world of the single-process draw of the global batch."""
    single = batch_randn((6, 3), torch.Generator().manual_seed(5), device="cpu")
    for rank in range(2):
        shard = batch_randn((3, 3), ShardedGenerator(torch.Generator().manual_seed(5), rank, 2), device="cpu")
        assert torch.equal(shard, single[rank::2])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_global_batch(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith(("--train.out_dir", "--train.batch_size"))]
    common += ["--train.steps=4", "--train.save_every=4", "--train.log_every=1", "--phases.k=1"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UNIGENDET_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           *common, "--train.batch_size=4", f"--train.out_dir={ddp}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = load_file(ddp / "rank0.safetensors"), load_file(ddp / "rank1.safetensors")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # replicas stay bit-identical

    cfg = load_config("tiny_cpu", common + ["--train.batch_size=8", f"--train.out_dir={single}"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    ref, got = _metrics(single), _metrics(ddp)
    assert [r["phase"] for r in ref] == [r["phase"] for r in got] == ["gen", "det", "gen", "det"]
    for a, b in zip(ref, got):  # same samples, same noise: the losses agree up to summation order
        for key in a:
            if "/" in key and not key.endswith("grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(rank0[name], p.detach(), atol=1e-4, rtol=1e-3, msg=name)
    assert len(list((ddp / "checkpoints").iterdir())) == 1  # rank 0 alone wrote the checkpoint
