"""train.compile with the fused backends: the extension's custom ops (attention's CPU kernels too) trace into
the compiled graphs without a graph break, and the compiled steps give the eager steps' losses."""
import pytest
import torch
from torch._dynamo.utils import counters

from op_testing import EXT_ONLY
from unigendet import backends, load_config, ops
from unigendet.train import Trainer


def _losses(trainer: Trainer, steps: int) -> list[dict[str, float]]:
    out = []
    for _ in range(steps):
        parts = trainer.step()
        out.append({k: float(v) for k, v in parts.items() if k != "phase"})
    return out


@EXT_ONLY
@pytest.mark.slow
def test_fused_compiled_steps_match_eager_without_graph_breaks(tiny_overrides, tmp_path):
    """4 steps (two of each phase, a pool refill first): compiled losses equal eager within rel 1e-3
    (inductor reorders fp32 reductions; the eager steps themselves are deterministic)."""
    x = torch.randn(1, 4, 2, 8)
    assert backends.select("mmsa_attention", "auto", x, x, x, x, x, x).__name__ == "mmsa_attention_ext"
    runs = {}
    for compile_ in (False, True):
        cfg = load_config("tiny_cpu", tiny_overrides + [
            "--ops.backend=auto", f"--train.compile={str(compile_).lower()}",
            f"--train.out_dir={tmp_path / f'compile-{compile_}'}"])
        ops.set_default_backend(cfg.ops.backend)
        torch._dynamo.reset()
        counters.clear()
        trainer = Trainer(cfg, log=lambda *_: None)
        runs[compile_] = _losses(trainer, 4)
        if compile_:
            assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
            # one per phase at least, and the refill's sampler pass: it really compiled
            assert counters["stats"]["unique_graphs"] >= 3
            assert trainer.sampler_model is not trainer.ema.model
    for step, (a, b) in enumerate(zip(runs[False], runs[True])):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (step, key)
