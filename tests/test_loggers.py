"""train.tensorboard / train.wandb: the metrics.jsonl numbers and sample grids; clear errors without the packages."""
import json
import shutil
import sys
import types

import numpy as np
import pytest

from unigendet.config import ConfigError, load_config
from unigendet.train import Trainer
from unigendet.train.checkpoint import list_checkpoints

STEPS = ["--train.steps=4", "--train.save_every=2", "--train.log_every=1", "--eval.sampler_steps=2"]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_every_metric_and_the_sample_grids(tiny_overrides, tmp_path):
    cfg = load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.tensorboard=true", "--train.sample_every=3"])
    Trainer(cfg).train()
    run = tmp_path / "run"
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # metrics.jsonl as without TensorBoard
    acc = _events(run)
    numbers = {k for m in metrics for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
    assert "gen/flow" in numbers and "det/bce" in numbers and "lr" in numbers
    assert set(acc.Tags()["scalars"]) == numbers
    for key in numbers:
        logged = {e.step: e.value for e in acc.Scalars(key)}
        assert logged == pytest.approx({m["step"]: m[key] for m in metrics if key in m}, rel=1e-6), key
    # the sample grid at step 3 (sample_every) and at the last step: 16 images of 32 px in a 4 x 4 grid
    images = acc.Images("samples")
    assert [e.step for e in images] == [3, 4]
    assert (images[0].width, images[0].height) == (4 * 34 + 2, 4 * 34 + 2)
    assert images[0].encoded_image_string != images[1].encoded_image_string  # the generator moved


def test_resume_replaces_what_was_logged_after_the_checkpoint(tiny_overrides, tmp_path):
    cfg = load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.tensorboard=true"])
    Trainer(cfg).train()
    run = tmp_path / "run"
    first = {e.step: e.value for e in _events(run).Scalars("lr")}
    shutil.rmtree(list_checkpoints(run)[-1])  # as if killed after logging step 4, before its checkpoint
    Trainer(cfg, resume=True).train()  # from step 2: steps 3 and 4 again
    acc = _events(run)
    assert [e.step for e in acc.Scalars("lr")] == [1, 2, 3, 4]  # each step once, not 1, 2, 3, 4, 3, 4
    assert {e.step: e.value for e in acc.Scalars("lr")} == pytest.approx(first)
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("samples")] == [2, 4]  # sample_every 0: with each checkpoint


def test_missing_tensorboard_is_a_config_error_naming_the_extra(tiny_overrides, tmp_path, monkeypatch, capsys):
    from unigendet.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    cfg = load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"train.tensorboard = true needs the tensorboard package.*\.\[tensorboard\]"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    assert main(["train", *tiny_overrides, *STEPS, "--train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install ".[tensorboard]"' in err, err
    # without train.tensorboard nothing asks for it
    Trainer(load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.steps=1"])).train()
    assert not (tmp_path / "run" / "tensorboard").exists()


class FakeWandb(types.ModuleType):
    """Records what the trainer hands to wandb (init, log, finish), the calls of wandb's public API."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        outer = self

        class Run:
            def log(self, values, step):
                outer.logged.append((step, values))

            def finish(self):
                outer.finished += 1

        self._run = Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._run()

    class Image:
        def __init__(self, pixels):
            self.pixels = np.asarray(pixels)


def test_wandb_gets_the_same_numbers_and_grids(tiny_overrides, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.wandb=true", "--train.wandb_project=demo"])
    Trainer(cfg).train()
    run = tmp_path / "run"
    (init,) = fake.inits
    run_id = (run / "wandb_run_id").read_text().strip()
    assert (init["project"], init["id"], init["resume"], init["dir"]) == ("demo", run_id, "allow", str(run))
    assert init["config"]["train"]["wandb_project"] == "demo"
    scalars = [(step, values) for step, values in fake.logged if "samples" not in values]
    expected = [(m["step"], {k: v for k, v in m.items() if k not in ("step", "phase")}) for m in _metrics(run)]
    assert scalars == expected
    grids = [(step, values["samples"].pixels) for step, values in fake.logged if "samples" in values]
    assert [step for step, _ in grids] == [2, 4] and grids[0][1].shape == (138, 138, 3)
    assert grids[0][1].dtype == np.uint8 and fake.finished == 1

    # --resume continues the same W&B run
    Trainer(load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.wandb=true", "--train.steps=6"]),
            resume=True).train()
    assert fake.inits[1]["id"] == run_id and fake.finished == 2


def test_missing_wandb_is_a_config_error_naming_the_package(tiny_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config("tiny_cpu", [*tiny_overrides, *STEPS, "--train.wandb=true"])
    with pytest.raises(ConfigError, match="train.wandb = true needs the wandb package.*pip install wandb"):
        Trainer(cfg)
