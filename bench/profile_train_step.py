"""Where one training step spends its time: torch.profiler over `Trainer.step()`, by category.

    python -m bench.profile_train_step                          # tiny_cpu, ops.backend = auto
    python -m bench.profile_train_step --backend reference --steps 40 --model.depth=2   # config overrides too

Categories (ms per step and share of the wall time):
  attention          ops.mmsa_attention, forward and backward
  backbone: <op>     ops.fused_add_rmsnorm, ops.qk_rmsnorm_rope, ops.swiglu, F.linear (fwd and bwd)
  losses             the flow loss, L_MMSA and the BCE + alignment loss as the phases call them (fwd and bwd)
  pool refill        Trainer._refill: the EMA generator's Euler sampling of fake images (everything inside)
  optimizer + EMA    optimizer.step and ema.update
  data               the loader's next batch and its copy into the static batch
  other tensor ops   every other op of the step (embeddings, modulation, elementwise glue, their bwd)
  Python / autograd  the remainder: wall time outside every op the profiler records

Forward ops count for the outermost labelled call they run in (the refill's attention counts as
refill). An autograd backward node (and every op inside it) counts for the category of the forward
op that created it: the profiler gives both the same sequence number (ops run without grad record
the number the next node will take, so the creator is the last forward op recorded with it). Times
are self times of the recorded ops, so nothing is counted twice (the autograd engine's own recorded
time goes to its node's category). The step count should cover one refill (phases.refill_every, 40 for tiny_cpu) so
the refill's share is its amortised cost.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import bench_device, device_name, markdown_table, write_results
from unigendet import load_config, ops
from unigendet.data import write_demo_dataset
from unigendet.train import Trainer, phases

LABEL = "cat::"  # prefix of the record_function ranges this script adds
BACKBONE = {"fused_add_rmsnorm": "backbone: rmsnorm", "qk_rmsnorm_rope": "backbone: qk rmsnorm+rope",
            "swiglu": "backbone: swiglu"}
ORDER = ["attention", "backbone: linear", "backbone: rmsnorm", "backbone: qk rmsnorm+rope", "backbone: swiglu",
         "losses", "pool refill", "optimizer + EMA", "data", "other tensor ops", "Python / autograd"]


def _labelled(fn, category: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(LABEL + category):
            return fn(*args, **kwargs)
    return wrapper


def instrument(trainer: Trainer) -> None:
    """Wrap the calls of each category in a labelled profiler range (module attributes the model reads
    at call time, and this trainer's own methods)."""
    ops.mmsa_attention = _labelled(ops.mmsa_attention, "attention")
    for name, cat in BACKBONE.items():
        setattr(ops, name, _labelled(getattr(ops, name), cat))
    F.linear = _labelled(F.linear, "backbone: linear")
    for name in ("flow_loss", "mmsa_consistency", "combined_bce_align"):  # the names the phases call
        setattr(phases, name, _labelled(getattr(phases, name), "losses"))
    trainer._refill = _labelled(trainer._refill, "pool refill")
    trainer.optimizer.step = _labelled(trainer.optimizer.step, "optimizer + EMA")
    trainer.ema.update = _labelled(trainer.ema.update, "optimizer + EMA")
    data_iter = trainer._data_iter

    def labelled_batches():
        while True:
            with record_function(LABEL + "data"):
                batch = next(data_iter)
            yield batch
    trainer._data_iter = labelled_batches()
    if trainer.inputs is not None:
        trainer.inputs.load = _labelled(trainer.inputs.load, "data")


def _outer_label(event) -> str | None:
    label, e = None, event
    while e is not None:
        if e.name.startswith(LABEL):
            label = e.name[len(LABEL):]
        e = e.cpu_parent
    return label


def categorise(events) -> dict[str, float]:
    """{category: self CPU ms} over the profiled events (see the module docstring)."""
    by_seq: dict[int, str] = {}  # autograd node sequence number -> the category of the op that created it
    # Every op records the next free sequence number; only an op that creates an autograd node takes it.
    # Ops under no_grad (the DIGA teacher pass, the refill) record it too, before the op that takes it,
    # so the node's creator is the last forward op recorded with its number (or a child of that op).
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith(LABEL):
            label = _outer_label(e)
            if label is not None and "Backward" not in e.name:
                by_seq[e.sequence_nr] = label
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(LABEL):
            continue
        label = _outer_label(e)
        if label is None:  # a backward op: the category of the forward op of its autograd node
            p = e
            while p is not None and label is None:
                if "Backward" in p.name and p.sequence_nr is not None and p.sequence_nr >= 0:
                    label = by_seq.get(p.sequence_nr)
                p = p.cpu_parent
        totals[label or "other tensor ops"] += e.self_cpu_time_total / 1e3
    return totals


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_cpu")
    ap.add_argument("--backend", default="auto", help="ops.backend for the profiled trainer")
    ap.add_argument("--compile", action="store_true", help="train.compile = true (the graphs count as other ops)")
    ap.add_argument("--warmup", type=int, default=5, help="unprofiled steps first")
    ap.add_argument("--steps", type=int, default=40, help="profiled steps (cover one pool refill)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--name", default="profile_train_step", help="the table's name under bench/results/<device>/")
    ap.add_argument("--no-save", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    device = bench_device("cpu")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_dataset(Path(tmp) / "demo", seed=0)
        cfg = load_config(args.config, [
            f"--data.root={tmp}/demo/train", f"--train.out_dir={tmp}/run", "--train.device=cpu",
            f"--ops.backend={args.backend}", f"--train.compile={str(args.compile).lower()}",
            "--train.progress=false", "--data.num_workers=0", *overrides])
        ops.set_default_backend(cfg.ops.backend)
        trainer = Trainer(cfg, log=lambda *_: None)
        for _ in range(args.warmup):
            trainer.step()
        instrument(trainer)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            wall_ms = (time.perf_counter() - t0) * 1e3
        totals = categorise(prof.events())
    # the profiler's own cost inflates the wall time; the shares are of the profiled wall time
    totals["Python / autograd"] = max(0.0, wall_ms - sum(totals.values()))
    rows = [{"category": c, "ms_per_step": totals.get(c, 0.0) / args.steps,
             "share": totals.get(c, 0.0) / wall_ms} for c in ORDER]
    rows.append({"category": "total (profiled wall)", "ms_per_step": wall_ms / args.steps, "share": 1.0})
    dev = device_name(device)
    title = (f"train step ({args.config}, ops.backend={args.backend}, compile={args.compile}) on {dev}, "
             f"{args.threads} threads, {args.steps} steps after {args.warmup}, "
             f"{datetime.date.today().isoformat()}")
    print(markdown_table(rows, ["category", "ms_per_step", "share"], title=title))
    if not args.no_save:
        print(f"wrote {write_results(args.name, rows, device)}/{args.name}.csv and .md")
    return rows


if __name__ == "__main__":
    main()
