"""A tiny untrained checkpoint in a second: a random-init model saved as a step folder (no training).

Inference tests (detect, generate) need weights that load, not weights that are good."""
from pathlib import Path

TINY_MODEL = ["--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1",
              "--model.align_layer=1", "--model.projector_hidden=32"]


def write_tiny_checkpoint(run_dir: Path, *, step: int = 7, extra: tuple[str, ...] = ()) -> Path:
    """run_dir/checkpoints/step_{step:07d} holding a seeded random-init tiny model (model = ema)."""
    import torch

    from unigendet.config import load_config
    from unigendet.model import UniGenDet
    from unigendet.train import save_checkpoint

    cfg = load_config("tiny_cpu", [*TINY_MODEL, f"--train.out_dir={run_dir}", "--eval.batch_size=4",
                                   "--eval.sampler_steps=2", *extra])
    torch.manual_seed(0)
    model = UniGenDet(cfg.model)
    return save_checkpoint(run_dir, step, model, model, {}, cfg)
