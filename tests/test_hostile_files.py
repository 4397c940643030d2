"""Hostile inputs, each built in a temp folder: foreign run folders, special files, odd file names,
damaged checkpoints and bad command-line values."""
import json
import os
import shutil

import pytest

from unigendet.cli import main
from unigendet.config import load_config
from unigendet.train import Trainer, TrainingError, list_checkpoints

QUIET = dict(log=lambda *_: None)


def _train(overrides, *extra, resume=False):
    cfg = load_config("tiny_cpu", overrides + list(extra))
    trainer = Trainer(cfg, resume=resume, **QUIET)
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------- run folders


def test_train_refuses_a_folder_that_is_not_a_run(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("my own notes\n")
    (run / "checkpoints" / ".tmp_step_0000002_1").mkdir(parents=True)
    (run / "checkpoints" / ".tmp_step_0000002_1" / "thesis.txt").write_text("keep me")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--config", "tiny_cpu", *tiny_overrides, "--train.steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "not a unigendet run folder" in err and str(run) in err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # --resume too
    assert main(["train", "--config", "tiny_cpu", *tiny_overrides, "--train.steps=2", "--resume"]) == 2


def test_run_folder_is_marked_and_user_files_survive(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides, "--train.steps=2", "--train.save_every=2")
    assert (run / ".unigendet_run").is_file()
    ckpts = run / "checkpoints"
    user_tmp = ckpts / ".tmp_step_0000003_1"
    user_tmp.mkdir()
    (user_tmp / "thesis.txt").write_text("keep me")
    ours_tmp = ckpts / ".tmp_step_0000003_2"  # what a kill while saving leaves
    ours_tmp.mkdir()
    (ours_tmp / "model.safetensors").write_bytes(b"partial")
    user_step = ckpts / "step_0000004"  # incomplete step folder holding a user's file
    user_step.mkdir()
    (user_step / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="step_0000004.*did not write"):
        _train(tiny_overrides, "--train.steps=4", "--train.save_every=2", resume=True)
    assert (user_tmp / "thesis.txt").read_text() == "keep me"
    assert not ours_tmp.exists()
    assert (user_step / "notes.txt").read_text() == "mine"


def test_resume_drops_metrics_after_the_checkpoint_and_partial_steps(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides, "--train.steps=4", "--train.save_every=2", "--train.keep_last=5")
    # a kill after step 4 was logged but while step 4's checkpoint was being pruned: step_0000004 partial
    partial = run / "checkpoints" / "step_0000004"
    (partial / "model.safetensors").unlink()
    _train(tiny_overrides, "--train.steps=6", "--train.save_every=2", "--train.keep_last=5", resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # 4 logged again after resuming from 2, once
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004", "step_0000006"]


def test_run_from_before_the_marker_still_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides, "--train.steps=2", "--train.save_every=2")
    (run / ".unigendet_run").unlink()  # as written by an older unigendet
    with pytest.raises(TrainingError, match="--resume"):
        _train(tiny_overrides, "--train.steps=4", "--train.save_every=2")
    trainer = _train(tiny_overrides, "--train.steps=4", "--train.save_every=2", resume=True)
    assert trainer.step_idx == 4 and (run / ".unigendet_run").is_file()


def test_resume_into_a_new_folder_twice(tiny_overrides, tmp_path):
    """What `make demo` does: train --resume into a folder that does not exist, then again."""
    args = ["train", "--config", "tiny_cpu", *tiny_overrides, "--train.steps=2", "--train.save_every=2", "--resume"]
    assert main(args) == 0
    assert main(args) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002"]


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_step(demo_root, tmp_path_factory):
    """A tiny trained checkpoint step folder (read-only use: tests copy it)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    overrides = [f"--data.root={demo_root / 'train'}", f"--eval.data={demo_root / 'val'}", f"--train.out_dir={run}",
                 "--model.width=32", "--model.depth=2", "--model.heads=2", "--model.kv_heads=1",
                 "--model.align_layer=1", "--model.projector_hidden=32", "--train.batch_size=8",
                 "--phases.pool_size=16", "--phases.refill_count=8", "--phases.sampler_steps=2",
                 "--train.progress=false", "--data.num_workers=0", "--train.log_every=2", "--optim.warmup_steps=2",
                 "--train.steps=2", "--train.save_every=2", "--eval.batch_size=4", "--eval.sampler_steps=2"]
    _train(overrides)
    return list_checkpoints(run)[-1]


def _damaged(step, tmp_path, change):
    """A copy of `step` whose model and ema weights went through change(dict) -> dict."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / step.name
    shutil.copytree(step, out)
    for which in ("model", "ema"):
        tensors = load_file(out / f"{which}.safetensors")
        save_file(change(tensors), out / f"{which}.safetensors", metadata={"format_version": "1", "step": "2"})
    return out


def _first_weight(tensors):
    return next(k for k, v in tensors.items() if v.dim() == 2)


@pytest.mark.parametrize("kind", ["shape", "int64", "nan", "config"])
def test_damaged_checkpoint_is_one_line_exit_2(trained_step, demo_root, tmp_path, capsys, kind):
    import torch

    name = {}

    def change(t):
        key = name.setdefault("key", _first_weight(t))
        if kind == "shape":
            t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
        elif kind == "int64":
            t[key] = t[key].round().to(torch.int64)
        elif kind == "nan":
            t[key] = t[key].clone()
            t[key][0, 0] = float("nan")
        return t

    step = _damaged(trained_step, tmp_path, change)
    if kind == "config":  # the step folder's config says another model than its weights hold
        text = (step / "config.toml").read_text()
        (step / "config.toml").write_text(text.replace("width = 32", "width = 64", 1))
    image = next((demo_root / "val" / "real").iterdir())
    code = main(["detect", "--ckpt", str(step), str(image)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "safetensors" in err and "tensor " in err
    if kind != "config":
        assert name["key"] in err
    assert {"shape": "shape", "int64": "int64", "nan": "non-finite", "config": "shape"}[kind] in err
