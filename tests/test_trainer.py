"""The trainer on the demo data: losses go down, checkpoints round-trip, resume is exact, bad steps."""
import json
from pathlib import Path

import pytest
import torch

from op_testing import EXT_ONLY
from resume_check import assert_same_weights, resume_after_kill
from unigendet import load_config
from unigendet.model import UniGenDet
from unigendet.train import Trainer, TrainingError, list_checkpoints, load_weights


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_flow_and_bce(tiny_overrides, tmp_path):
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=100", "--train.save_every=100", "--optim.lr=3e-3",
                                                    "--phases.mode=joint", "--train.batch_size=16",
                                                    "--train.log_every=10"])
    Trainer(cfg, log=lambda *_: None).train()
    rows = metrics(tmp_path / "run")
    first = {k: (rows[0][k] + rows[1][k]) / 2 for k in ("joint/flow", "joint/bce")}
    last = {k: (rows[-1][k] + rows[-2][k]) / 2 for k in ("joint/flow", "joint/bce")}
    assert last["joint/flow"] < 0.93 * first["joint/flow"], (first, last)
    assert last["joint/bce"] < 0.8 * first["joint/bce"], (first, last)
    assert all(k in rows[-1] for k in ("joint/align", "joint/auth", "lr", "samples_per_s"))


def test_checkpoint_layout_and_weights_roundtrip(tiny_overrides, tmp_path):
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=4", "--train.save_every=2", "--train.keep_last=1"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    run = tmp_path / "run"
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_0000004"]  # keep_last=1 pruned step 2
    assert {p.name for p in ckpts[0].iterdir()} == {"model.safetensors", "ema.safetensors", "trainer_state.pt",
                                                     "config.toml"}
    assert (run / "config.toml").is_file() and (run / "metrics.jsonl").is_file()
    fresh = UniGenDet(cfg.model)
    assert load_weights(ckpts[0], fresh, "model") == 4
    for (n, a), b in zip(trainer.model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_is_exact(tiny_overrides, tmp_path):
    straight = load_config("tiny_cpu", tiny_overrides + ["--train.steps=6", "--train.save_every=6",
                                                         f"--train.out_dir={tmp_path / 'a'}"])
    a = Trainer(straight, log=lambda *_: None)
    a.train()
    first = load_config("tiny_cpu", tiny_overrides + ["--train.steps=6", "--train.save_every=3",
                                                      f"--train.out_dir={tmp_path / 'b'}"])
    assert_same_weights(a, resume_after_kill(first, kill_at=3))


def test_refuses_to_overwrite_a_run_without_resume(tiny_overrides):
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=2", "--train.save_every=2"])
    Trainer(cfg, log=lambda *_: None).train()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg, log=lambda *_: None)


def test_nonfinite_loss_is_skipped_then_stops(tiny_overrides, monkeypatch):
    import unigendet.train.trainer as trainer_mod

    real = trainer_mod.phase_loss
    poisoned = {"on": False}

    def maybe_nan(*args, **kwargs):
        terms = real(*args, **kwargs)
        if poisoned["on"]:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(trainer_mod, "phase_loss", maybe_nan)
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=20", "--train.save_every=2",
                                                    "--train.max_bad_steps=3"])
    logs = []
    t = Trainer(cfg, log=logs.append)
    t.step()
    state = lambda: [p.detach().clone() for p in [*t.model.parameters(), *t.ema.model.parameters()]]  # noqa: E731
    moments = lambda: [s["exp_avg"].clone() for s in t.optimizer.state.values()]  # noqa: E731
    before, before_m = state(), moments()
    poisoned["on"] = True
    t.step()  # skipped on the device: no exception, no host read
    t.check_health()
    assert t.skipped_steps == 1 and t.bad_steps == 1 and any("non-finite" in m for m in logs)
    assert all(torch.equal(a, b) for a, b in zip(before, state()))  # neither weights nor EMA moved
    assert all(torch.equal(a, b) for a, b in zip(before_m, moments()))  # nor the Adam moments
    t.step()
    t.check_health()  # 2 in a row: still under the limit
    t.step()
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        t.check_health()
    poisoned["on"] = False
    t.step()
    assert t.bad_steps == 0 and t.skipped_steps == 3  # a good step resets the run, not the total


def test_nonfinite_gradient_with_finite_loss_is_skipped(tiny_overrides, monkeypatch):
    """A NaN that appears only in the backward (finite loss) is caught by the gradient-norm check."""
    import unigendet.train.trainer as trainer_mod

    real = trainer_mod.phase_loss

    def nan_grad(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.total = _NanGrad.apply(terms.total)  # forward: the same value; backward: NaN everywhere
        return terms

    monkeypatch.setattr(trainer_mod, "phase_loss", nan_grad)
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=4", "--phases.mode=joint"])
    t = Trainer(cfg, log=lambda *_: None)
    before = [p.detach().clone() for p in t.model.parameters()]
    parts = t.step()
    assert torch.isfinite(parts["total"])
    assert t.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_stage_two_starts_from_a_stage_one_checkpoint(tiny_overrides, tmp_path):
    stage1 = load_config("tiny_cpu", tiny_overrides + ["--train.steps=2", "--train.save_every=2",
                                                       "--phases.mode=joint", f"--train.out_dir={tmp_path / 's1'}"])
    first = Trainer(stage1, log=lambda *_: None)
    first.train()
    stage2 = load_config("tiny_cpu", tiny_overrides + ["--train.steps=2", "--phases.mode=diga",
                                                       f"--train.init_from={tmp_path / 's1'}",
                                                       f"--train.out_dir={tmp_path / 's2'}"])
    second = Trainer(stage2, log=lambda *_: None)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    second.train()
    # joint detects on fake-pool images; diga has no detection phase, so it never fills a pool
    assert (first.uses_pool, second.uses_pool) == (True, False) and second.pool.count == 0 < first.pool.count
    # diga trains the generator expert only: every detector-owned weight is unchanged
    for name, p in second.model.named_parameters():
        if second.model.param_owner(name) == "det":
            assert torch.equal(p, dict(first.model.named_parameters())[name]), name


def _class_folder(root, classes=("cats", "dogs"), per_class=8):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        folder = root / "real" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(20, 20, 3, generator=g) * 128 + 100 * c).clamp(0, 255).byte().numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_class_conditional_training(tiny_overrides, tmp_path):
    data = _class_folder(tmp_path / "classes")
    cfg = load_config("tiny_cpu", tiny_overrides + [f"--data.root={data}", "--model.num_classes=2",
                                                    "--train.steps=3", "--train.save_every=3"])
    t = Trainer(cfg, log=lambda *_: None)
    t.train()
    assert t.model.gen_embed.classes.num_embeddings == 3  # two classes + the "no class" token
    bad = load_config("tiny_cpu", tiny_overrides + [f"--data.root={data}", "--model.num_classes=5"])
    with pytest.raises(TrainingError, match="model.num_classes = 5 but .* has 2 class folders"):
        Trainer(bad, log=lambda *_: None)


def test_throughput_fields_and_the_flop_count(tiny_overrides):
    """metrics.jsonl carries samples/s, tokens/s and step time (MFU only on a GPU with a known peak);
    the dense part of the FLOP count uses exactly the parameters of one expert stack."""
    from unigendet.train.throughput import tokens_per_sample, train_flops_per_sample

    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=2", "--train.log_every=2"])
    Trainer(cfg, log=lambda *_: None).train()
    rows = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["tokens_per_s"] == pytest.approx(last["samples_per_s"] * tokens_per_sample(cfg.model))
    assert last["step_ms"] > 0 and "mfu" not in last  # CPU: no peak to compare with
    model = UniGenDet(cfg.model)
    matrices = sum(p.numel() for b in model.blocks for n, p in b.experts["g"].named_parameters() if p.ndim == 2)
    m = cfg.model
    t_g = (m.image_size // m.patch_size) ** 2
    t_d = t_g + m.registers
    no_mmsa = m.__class__(**{**vars(m), "g2d": False, "d2g": False})
    attention = 12.0 * (t_g ** 2 + t_d ** 2) * m.width * m.depth  # each stream attends to itself only
    assert tokens_per_sample(m) == t_g + t_d
    assert train_flops_per_sample(no_mmsa) - attention == pytest.approx(6.0 * matrices * (t_g + t_d))
    with_mmsa = train_flops_per_sample(m) - train_flops_per_sample(no_mmsa)
    assert with_mmsa == pytest.approx(12.0 * 2 * t_g * t_d * m.width * m.depth)


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny_overrides, tmp_path):
    """train.compile: 2 steps (one per phase) log the losses of the eager step, to compile accuracy."""
    def run(compile_):
        out = tmp_path / f"compile-{compile_}"
        cfg = load_config("tiny_cpu", tiny_overrides + [
            "--train.steps=2", "--train.log_every=1", "--phases.k=1", f"--train.compile={compile_}",
            f"--train.out_dir={out}"])
        trainer = Trainer(cfg, log=lambda *_: None)
        trainer.train()
        assert (trainer.step_model is not trainer.model) == compile_
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    eager, compiled = run(False), run(True)
    for a, b in zip(eager, compiled):
        for key in a:
            if "/" in key:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)


@EXT_ONLY
def test_steps_under_bf16_autocast_keep_one_dtype_per_stream(tiny_overrides, monkeypatch):
    """What a CUDA run gets (bf16 autocast), here on CPU with the ext backend: an fp32 buffer added to
    an autocast output once made the residual stream fp32 while each block's output was bf16, and the
    fused norm refused the mix on the first GPU step. Every norm call sees one dtype, and steps run."""
    from unigendet import ops

    seen = []
    fused = ops.fused_add_rmsnorm

    def spy(x, residual, weight, *args, **kwargs):
        seen.append((x.dtype, None if residual is None else residual.dtype))
        return fused(x, residual, weight, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_add_rmsnorm", spy)
    trainer = Trainer(load_config("tiny_cpu", tiny_overrides + ["--ops.backend=ext"]), log=lambda *_: None)
    trainer.autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    for _ in range(3):  # gen, det, gen
        trainer.step()
    assert seen and all(r in (None, x) for x, r in seen), sorted(set(seen), key=str)
    assert {x for x, _ in seen} == {torch.bfloat16}


def test_adamw_eps_reaches_the_optimizer(tiny_overrides, tmp_path):
    default = Trainer(load_config("tiny_cpu", tiny_overrides), log=lambda *_: None)
    assert {g["eps"] for g in default.optimizer.param_groups} == {1e-8}  # torch's default, as before
    cfg = load_config("tiny_cpu", tiny_overrides + ["--optim.eps=1e-15", f"--train.out_dir={tmp_path / 'eps'}"])
    t = Trainer(cfg, log=lambda *_: None)
    assert len(t.optimizer.param_groups) > 1 and {g["eps"] for g in t.optimizer.param_groups} == {1e-15}


def test_published_presets_train_tiny(tiny_overrides, tmp_path):
    """Both presets, shrunk to a CPU-sized model (the published align-layer ratio and the 4C GELU
    projector kept), train 2 steps; stage II starts from the stage I run."""
    tiny = tiny_overrides + ["--train.device=cpu", "--data.image_size=16", "--model.projector_hidden=0",
                             "--model.align_layer=1", "--train.steps=2", "--train.save_every=2"]
    stage1 = load_config("published", tiny + [f"--train.out_dir={tmp_path / 's1'}"])
    assert stage1.model.align_layer == max(1, round(8 * stage1.model.depth / 28))
    first = Trainer(stage1, log=lambda *_: None)
    assert isinstance(first.model.projector[1], torch.nn.GELU)
    assert first.model.projector[0].out_features == 4 * stage1.model.width
    assert {g["eps"] for g in first.optimizer.param_groups} == {1e-15}
    assert {g["weight_decay"] for g in first.optimizer.param_groups} == {0.0}
    first.train()
    rows = metrics(tmp_path / "s1")
    assert rows[-1]["step"] == 2 and all(k.startswith("joint/") for k in rows[-1] if "/" in k)
    cfg = load_config("published_stage2", tiny + [f"--train.init_from={tmp_path / 's1'}",
                                                  f"--train.out_dir={tmp_path / 's2'}"])
    second = Trainer(cfg, log=lambda *_: None)
    assert second.ema.decay == 0.95
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    second.train()
    assert metrics(tmp_path / "s2")[-1]["step"] == 2
    for name, p in second.model.named_parameters():  # stage II trains the generator expert only
        if second.model.param_owner(name) == "det":
            assert torch.equal(p, dict(first.model.named_parameters())[name]), name
