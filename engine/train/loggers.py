"""Training logs besides metrics.jsonl: TensorBoard event files and Weights & Biases, behind one interface.

    loggers = RunLoggers(cfg, out_dir, active=is_main_rank)  # checks the packages at once
    loggers.begin(step)                # the step training starts (resumes) from
    loggers.scalars(step, metrics)     # every number of a metrics.jsonl line, under its key
    loggers.image(step, "samples", grid)
    loggers.flush(); loggers.close()

train.tensorboard writes `<run>/tensorboard/events.out.tfevents.*`; train.wandb logs to the project
train.wandb_project, under a run id kept in `<run>/wandb_run_id` so that `--resume` continues the
same W&B run. Both are optional packages, imported only when a run asks for them: a missing one is a
`ConfigError` naming the key and the package before anything is trained. Files are opened on the
first record, so a Trainer that never logs leaves nothing behind.

Resuming rewinds what was logged after the checkpoint, as metrics.jsonl does: TensorBoard is opened
with purge_step = the resumed step + 1 (later events of the earlier attempt are hidden).
"""
from __future__ import annotations

import importlib
import secrets
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, to_dict
from ..grid import image_grid
from ..model import euler_sample

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
TENSORBOARD_HINT = ('install the tensorboard extra: pip install ".[tensorboard]" in the source checkout, '
                    "or pip install tensorboard")


def _require(module: str, key: str, hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key} = true needs the {module.split('.')[0]} package, which cannot be imported "
                          f"({e}); {hint}, or set {key} = false") from None


class _TensorBoard:
    def __init__(self, out_dir: Path, start_step: int):
        _require("tensorboard", "train.tensorboard", TENSORBOARD_HINT)
        summary = _require("torch.utils.tensorboard", "train.tensorboard", TENSORBOARD_HINT)
        self.writer = summary.SummaryWriter(str(out_dir / TENSORBOARD_DIR),
                                            purge_step=start_step + 1 if start_step > 0 else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, cfg: Config, out_dir: Path, resumed: bool):
        self.wandb = _require("wandb", "train.wandb", "install it: pip install wandb")
        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(project=cfg.train.wandb_project, name=out_dir.name, id=run_id, resume="allow",
                                   dir=str(out_dir), config=to_dict(cfg))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(pixels)}, step=step)

    def flush(self) -> None:
        pass  # W&B syncs in its own process

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """TensorBoard and / or W&B as train.tensorboard / train.wandb ask; inactive (every call a no-op)
    when neither is on or on ranks other than the first (`active=False`)."""

    def __init__(self, cfg: Config, out_dir: str | Path, *, active: bool = True):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.enabled = bool(cfg.train.tensorboard or cfg.train.wandb)  # the same on every rank
        self.active = active and self.enabled
        self.start_step = 0
        self._last_step = 0
        self._backends: list | None = None
        if cfg.train.tensorboard:  # a missing package fails now, on every rank, before any work
            _require("tensorboard", "train.tensorboard", TENSORBOARD_HINT)
            _require("torch.utils.tensorboard", "train.tensorboard", TENSORBOARD_HINT)
        if cfg.train.wandb:
            _require("wandb", "train.wandb", "install it: pip install wandb")

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at `step`: later records replace what an earlier attempt logged after it."""
        self.start_step = int(step)

    def _open(self) -> list:
        if self._backends is None:
            self._backends = []
            if self.cfg.train.tensorboard:
                self._backends.append(_TensorBoard(self.out_dir, self.start_step))
            if self.cfg.train.wandb:
                self._backends.append(_Wandb(self.cfg, self.out_dir, resumed=self.start_step > 0))
        return self._backends

    def scalars(self, step: int, metrics: dict) -> None:
        """Every number of `metrics` (a metrics.jsonl record) under its key, NaN included (a diverging
        loss should show); `step` itself and strings (the phase name) are left out."""
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for backend in self._open():
            backend.scalars(step, values)
        self._last_step = max(self._last_step, step)

    def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
        """One (H, W, 3) uint8 image, e.g. a sample grid."""
        if not self.active:
            return
        for backend in self._open():
            backend.image(step, tag, pixels)
        self._last_step = max(self._last_step, step)

    def flush(self) -> None:
        for backend in self._backends or []:
            backend.flush()

    def close(self) -> None:
        for backend in self._backends or []:
            backend.close()
        if self._backends:  # opened again later (train() once more): keep what was logged until now
            self.start_step = max(self.start_step, self._last_step)
        self._backends = None


# ----------------------------------------------------------------------------- sample grids

SAMPLE_SEED = 1_000_033  # noise of the logged sample grids: the same at every step, never used in training
SAMPLE_COUNT = 16


def sample_grid(model, cfg: Config, device, autocast) -> np.ndarray:
    """(H, W, 3) uint8 grid of SAMPLE_COUNT images `model` samples from fixed noise (and fixed classes),
    with the evaluation sampler (eval.sampler_steps, eval.timestep_shift, eval.cfg_scale), so the
    grids of successive steps show the same samples improving."""
    generator = torch.Generator(device=device)
    generator.manual_seed(SAMPLE_SEED)
    ids = None
    if model.cfg.num_classes > 0:
        ids = torch.randint(0, model.cfg.num_classes, (SAMPLE_COUNT,), generator=generator, device=device)
    with torch.no_grad(), autocast:
        images = euler_sample(model, SAMPLE_COUNT, steps=cfg.eval.sampler_steps, generator=generator, class_ids=ids,
                              cfg_scale=cfg.eval.cfg_scale, device=device, shift=cfg.eval.timestep_shift)
    return np.asarray(image_grid(images))  # (H, W, 3) uint8
