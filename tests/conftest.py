"""Shared fixtures. Without a GPU, TRITON_INTERPRET=1 is set before any module defining @triton.jit
kernels is imported (unigendet imports kernels/ lazily), so the Triton kernels run on the CPU
interpreter; with a GPU they are compiled for it."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("UNIGENDET_BACKEND", None)  # tests choose backends explicitly

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The embedded demo dataset, written once per test session (train/ and val/)."""
    from unigendet.data import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=0)
    return root


@pytest.fixture
def tiny_overrides(demo_root, tmp_path):
    """Overrides that make `tiny_cpu` train in seconds: a very small model and few steps."""
    return [f"--data.root={demo_root / 'train'}", f"--eval.data={demo_root / 'val'}",
            f"--train.out_dir={tmp_path / 'run'}", "--model.width=32", "--model.depth=2", "--model.heads=2",
            "--model.kv_heads=1", "--model.align_layer=1", "--model.projector_hidden=32", "--train.batch_size=8",
            "--phases.pool_size=16", "--phases.refill_count=8", "--phases.sampler_steps=2",
            "--train.progress=false", "--data.num_workers=0", "--train.log_every=2", "--optim.warmup_steps=2"]
