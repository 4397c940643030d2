"""The trainer: data -> phase step -> optimizer -> EMA -> fake pool -> logs and checkpoints.

    trainer = Trainer(load_config("tiny_cpu"))   # or Trainer(cfg, resume=True)
    summary = trainer.train()

One optimizer step is `Trainer.step()`: pick the phase for this step, make its parameters trainable,
compute `phase_loss`, backpropagate, clip, step AdamW and the LR schedule, update the EMA. Every
`phases.refill_every` steps the EMA generator refills part of the fake pool with an Euler sampler.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from .. import ops
from ..config import Config, ConfigError, TrainConfig, load_config, save_config, to_dict
from ..data import build_loader
from ..model import UniGenDet, euler_sample
from ..phase_modes import mode_uses_fake_pool, phase_at
from .detector_augment import build_detector_augment
from .checkpoint import (CheckpointError, check_vae, checkpoint_config, list_checkpoints, load_trainer_state,
                         load_weights, remove_stale, resolve_checkpoint, save_checkpoint, vae_record)
from .compile_choice import compile_choice, persistent_compile_cache
from .fake_pool import FakePool
from .graphs import DeviceSums, StaticBatch, StepGraphs
from .latent_inputs import LatentInputs
from .loggers import RunLoggers, sample_grid
from .optim import EMA, build_optimizer, device_lrs, lr_multiplier
from .phases import phase_loss, set_trainable
from ..rng import ShardedGenerator
from .distributed import GradientBuckets, init_distributed
from .fsdp import full, gather_state, shard_model, shard_optimizer_state
from .throughput import device_peak_flops, tokens_per_sample, train_flops_per_sample, vae_geometry, vae_step_flops


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses); the message says why and what was kept."""


# A run folder (train.out_dir) is marked by this file: `train` writes into a folder only when it is
# new, empty, marked, or a run written before the marker existed (config.toml + a complete checkpoint).
RUN_MARKER = ".unigendet_run"
RUN_FORMAT = "1"
RUN_MARKER_TEXT = f"unigendet run folder\nformat_version = {RUN_FORMAT}\n"


def check_run_dir(out_dir: Path) -> str:
    """'new' (missing or empty), 'run' (marked) or 'legacy' (an unmarked run of an older unigendet:
    a loadable config.toml and a complete checkpoint); anything else raises `TrainingError`."""
    if not out_dir.exists():
        return "new"
    if not out_dir.is_dir():
        raise TrainingError(f"{out_dir}: train.out_dir exists and is not a folder; choose another train.out_dir")
    try:
        if not any(out_dir.iterdir()):
            return "new"
    except OSError as e:
        raise TrainingError(f"{out_dir}: cannot read train.out_dir ({e.strerror or e})") from None
    marker = out_dir / RUN_MARKER
    if marker.is_file():
        try:
            text = marker.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise TrainingError(f"{marker}: cannot read the run marker ({e.strerror or e})") from None
        version = next((line.split("=", 1)[1].strip() for line in text.splitlines()
                        if line.startswith("format_version")), None)
        if version != RUN_FORMAT:
            raise TrainingError(f"{marker}: run folder format {version!r}, this unigendet writes {RUN_FORMAT!r}; "
                                "choose another train.out_dir")
        return "run"
    if (out_dir / "config.toml").is_file() and list_checkpoints(out_dir):
        try:
            load_config(out_dir / "config.toml")
            checkpoint_config(list_checkpoints(out_dir)[-1])
            return "legacy"
        except (ConfigError, CheckpointError):
            pass
    raise TrainingError(f"{out_dir}: train.out_dir is not empty and is not a unigendet run folder (no {RUN_MARKER}); "
                        "choose a new or empty folder")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl logged after `step` (a resumed run logs those steps again) and
    lines a kill cut short; the file is rewritten only when something is dropped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
            if isinstance(record, dict) and int(record.get("step", -1)) <= step and line.endswith("\n"):
                keep.append(line)
        except (ValueError, TypeError):
            pass
    if len(keep) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device = 'cuda' but no CUDA device is visible")
    return torch.device(name)


def check_modes(train: TrainConfig, device: torch.device, distributed: bool) -> None:
    """Refuse combinations of train.cuda_graphs / compile / fsdp that cannot work, saying what to change."""
    if train.cuda_graphs and device.type != "cuda":
        raise TrainingError(f"train.cuda_graphs = true needs a CUDA device; train.device resolved to "
                            f"{device.type}. Set train.cuda_graphs = false")
    if train.cuda_graphs and train.compile is True:
        raise TrainingError("train.cuda_graphs and train.compile are alternatives (compare them in "
                            "bench/bench_train_step.py); set one of them to false")
    if train.fsdp_param_dtype != "float32" and not train.fsdp:
        raise TrainingError(f"train.fsdp_param_dtype = {train.fsdp_param_dtype!r} applies to FSDP only; set "
                            "train.fsdp = true or leave it at 'float32'")
    if train.fsdp and not distributed:
        raise TrainingError("train.fsdp = true shards the model across the processes torchrun starts; start "
                            "the run with torchrun --nproc_per_node=N (N >= 2) or set train.fsdp = false")
    if train.fsdp and train.cuda_graphs:
        raise TrainingError("train.fsdp and train.cuda_graphs cannot be combined (the step's all-gathers and "
                            "reduce-scatters are not captured); set one of them to false")


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, log=print):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.cuda_graphs, self.fsdp = cfg.train.cuda_graphs, cfg.train.fsdp
        self.dist = init_distributed(self.device)  # single process unless started by torchrun
        check_modes(cfg.train, self.device, distributed=self.dist.enabled)
        # TensorBoard / W&B: a missing package stops here, before any work; only rank 0 writes
        self.loggers = RunLoggers(cfg, Path(cfg.train.out_dir), active=self.dist.is_main)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.log = log if self.dist.is_main else (lambda *_: None)
        ops.set_default_backend(cfg.ops.backend)
        self.out_dir = Path(cfg.train.out_dir)
        check_run_dir(self.out_dir)  # before anything is loaded: never write into someone else's folder
        # the VAE's record (its fingerprint hashes the weights: once per run); a latent run on shards
        # packed with this VAE (data pack --vae) reads their moments and never encodes
        self.vae_record = vae_record(cfg.model.vae) if cfg.model.vae else None
        packed_vae = self.vae_record["vae_sha256"] if self.vae_record else None
        self.loader = build_loader(cfg.data.root, cfg.data.image_size, cfg.train.batch_size, seed=cfg.train.seed,
                                   crop=cfg.data.crop, vae_fingerprint=packed_vae,
                                   crop_scale_min=cfg.data.crop_scale_min, flip=cfg.data.flip,
                                   num_workers=cfg.data.num_workers, loader=cfg.data.loader,
                                   quarantine=cfg.data.quarantine, max_file_mb=cfg.data.max_file_mb,
                                   cache_mb=cfg.data.cache_mb,
                                   rank=self.dist.rank,
                                   world_size=self.dist.world_size, device=str(self.device),
                                   # pinned host batches: the copy into the step's buffers is then
                                   # asynchronous instead of a host sync per step
                                   pin_memory=self.device.type == "cuda")
        if cfg.model.num_classes and self.loader.num_classes != cfg.model.num_classes:
            raise TrainingError(f"model.num_classes = {cfg.model.num_classes} but {cfg.data.root} has "
                                f"{self.loader.num_classes} class folders")
        torch.manual_seed(cfg.train.seed)  # model init is a function of the seed
        self.model = UniGenDet(cfg.model).to(self.device)
        self.vae, self.latent_inputs = self._load_vae()
        if cfg.train.init_from:  # a resumed run overwrites these with its own checkpoint below
            init = resolve_checkpoint(cfg.train.init_from)
            if self.vae is not None:
                check_vae(init, self.vae_record)
            load_weights(init, self.model, "model")
            log(f"initialised weights from {init}")
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        if self.vae is not None:  # after the EMA's deep copy: one VAE, shared, never copied
            self.model.attach_vae(self.vae)
            self.ema.model.attach_vae(self.vae)
        if self.fsdp:  # the model and its EMA are sharded alike, so the EMA update is local to each shard
            param_dtype = getattr(torch, cfg.train.fsdp_param_dtype)
            shard_model(self.model, self.device, param_dtype)
            shard_model(self.ema.model, self.device, param_dtype)
        # train.compile: the loss computation runs through torch.compile (graphs per phase, since each
        # phase trains other parameters); weights, optimizer and checkpoints stay on self.model.
        self.compiles, why = compile_choice(cfg.train, self.device.type)
        if self.compiles:  # compiled kernels are reused by later runs of the same code and config
            why += f"; compile cache {persistent_compile_cache()}"
        self.log(f"compile: {'on' if self.compiles else 'off'} ({why})")
        self.step_model = torch.compile(self.model) if self.compiles else self.model
        # the refill's sampler passes (EMA generator, no grad) compile too: one graph per refill size
        self.sampler_model = torch.compile(self.ema.model, dynamic=False) if self.compiles else self.ema.model
        self.optimizer = build_optimizer(self.model, cfg.optim, capturable=self.cuda_graphs)
        # data parallel: gradient all-reduce overlapped with the backward pass (inside a CUDA graph,
        # one all-reduce after it, captured with the step; FSDP reduce-scatters on its own)
        overlap = self.dist.enabled and not self.fsdp and not self.cuda_graphs
        self.grad_buckets = (GradientBuckets(self.model.parameters(), self.dist.world_size, cfg.train.ddp_bucket_mb)
                             if overlap else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(cfg.optim, cfg.train.steps))
        self.noise = torch.Generator(device=self.device)  # flow noise, timesteps, label dropout, pool draws
        self.noise.manual_seed(cfg.train.seed + 1)
        # batch-dimension draws of the global batch, this rank's rows (unigendet.rng); the pool
        # refill draws with self.noise in full on every rank, so all ranks hold the same pool
        self.draws = ShardedGenerator(self.noise, self.dist.rank, self.dist.world_size)
        # a latent model with d2g: its detection passes read latents beside the pixels, so the pool keeps
        # the posterior means of its fakes and each detecting step the means of its batch
        self.detects_with_latents = bool(cfg.model.vae) and cfg.model.d2g
        self.pool = FakePool(cfg.phases.pool_size, cfg.data.image_size, self.device, max_age=cfg.phases.max_fake_age,
                             latent_shape=self.model.x_shape if self.detects_with_latents else None)
        self.uses_pool = mode_uses_fake_pool(cfg.phases.mode)  # else no phase of the run reads the pool
        self.det_augment = build_detector_augment(cfg.augment)  # None unless [augment] asks for some
        self.step_idx = 0
        # Non-finite steps are counted on the device (no host sync per step) and read by
        # check_health() every train.log_every steps and before each checkpoint.
        self._bad_run = torch.zeros((), device=self.device)  # consecutive skipped steps
        self._skipped = torch.zeros((), device=self.device)  # skipped steps in the whole run
        self._skipped_reported = 0
        self._tokens_per_sample = tokens_per_sample(cfg.model)
        self._flops_per_sample = train_flops_per_sample(cfg.model)
        self._peak_flops = device_peak_flops(self.device)  # None on CPU: no MFU
        # the VAE's FLOPs per sample, apart from the model's (decode always; encode unless the first
        # batch brings packed latents, set in step())
        self._vae_flops = vae_step_flops(cfg, vae_geometry(cfg.model))
        self._vae_flops_per_sample = sum(self._vae_flops.values())
        # bf16 autocast on GPU; its weight-cast cache must be off while capturing CUDA graphs
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs)
                         if self.device.type == "cuda" else contextlib.nullcontext())
        self.inputs: StaticBatch | None = None  # the step's batch buffers, made from the first batch
        self.sums = DeviceSums(self.device)  # loss parts per phase, summed on the device between logs
        self.graphs = StepGraphs(self.cuda_graphs, generators=(self.noise,))
        if resume:
            self._resume()
        elif list_checkpoints(self.out_dir):
            raise TrainingError(f"{self.out_dir} already holds checkpoints; pass --resume to continue that run "
                                f"or set another train.out_dir")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            marker = self.out_dir / RUN_MARKER
            if not marker.is_file():
                marker.write_text(RUN_MARKER_TEXT)
            for kept in remove_stale(self.out_dir):
                self.log(f"left {kept} in place: it holds files unigendet did not write (it is not a checkpoint)")
            trim_metrics(self.out_dir / "metrics.jsonl", self.step_idx)
            self.loggers.begin(self.step_idx)  # TensorBoard hides what an earlier attempt logged after it
            save_config(cfg, self.out_dir / "config.toml")
        self.dist.barrier()
        self._data_iter = iter(self.loader)

    def _load_vae(self):
        """(FrozenVAE, LatentInputs) of a latent model; Nones in pixel space."""
        m = self.cfg.model
        if not m.vae:
            return None, None
        from ..vae import load_vae

        vae = load_vae(m.vae, self.device)
        if (vae.latent_channels, vae.downsample) != (m.latent_channels, m.latent_downsample):
            raise TrainingError(f"{m.vae}: the VAE has {vae.latent_channels} latent channels and downsamples by "
                                f"{vae.downsample}, but model.latent_channels = {m.latent_channels} and "
                                f"model.latent_downsample = {m.latent_downsample}; set them to 0 (read from the VAE)")
        return vae, LatentInputs(vae, self.cfg.train.seed, self.dist.rank)

    # ------------------------------------------------------------------ one step

    def _reads_batch_means(self, phase) -> bool:
        """Whether `phase` runs a detection pass of the batch's real images: its det terms, or the DIGA
        teacher of its alignment loss."""
        return phase.detects or (phase.generates and self.cfg.loss.lambda_dig * self.cfg.loss.w_align > 0)

    def refill_pool(self, n: int) -> None:
        """Generate n images with the EMA generator and push them into the fake pool (the regular
        refill of a full pool is one CUDA graph with train.cuda_graphs; the first fill runs eagerly)."""
        steady = n == self.cfg.phases.refill_count and self.pool.count == self.pool.capacity
        if steady:
            self.graphs.run("refill", lambda: self._refill(n))
        else:
            self._refill(n)

    @torch.no_grad()
    def _refill(self, n: int) -> None:
        m = self.sampler_model
        ids = None
        if m.cfg.num_classes > 0:
            ids = torch.randint(0, m.cfg.num_classes, (n,), device=self.device, generator=self.noise)
        # the uniform grid on purpose (no eval.timestep_shift): the pool's fakes, and so the detector's
        # training and resumed runs, stay what they were for every existing config
        with self.autocast:
            images = euler_sample(m, n, steps=self.cfg.phases.sampler_steps, generator=self.noise, class_ids=ids)
            # what `detect` would read of these images: the posterior means of the decoded pixels
            latents = self.vae.encode_latents(images) if self.detects_with_latents else None
        self.pool.add(images, latents)

    def step(self) -> dict:
        """One optimizer step; returns its phase name and loss parts (device scalars; with CUDA graphs
        the captured step's outputs, rewritten by the next step of the same phase)."""
        cfg = self.cfg
        phase = phase_at(self.step_idx, cfg.phases.mode, cfg.phases.k)
        if self.uses_pool:
            self.pool.set_step(self.step_idx)  # the device clock the pool stamps and ages images by
            # the schedule, plus a refill whenever nothing in the pool is young enough to sample
            # (phases.max_fake_age >= refill_every makes that happen only after a resume)
            if self.pool.must_refill() or self.step_idx % cfg.phases.refill_every == 0:
                self.refill_pool(self.pool.capacity if self.pool.count == 0 else cfg.phases.refill_count)
        batch = next(self._data_iter)
        if self.inputs is None:
            self.inputs = StaticBatch(batch, self.device)
            if getattr(batch, "latent_moments", None) is not None:  # packed latents: the step never encodes
                self._vae_flops_per_sample = self._vae_flops["vae_decode"] + self._vae_flops["vae_encode_detect"]
            if hasattr(self.loader, "write_into"):  # DALI: later batches decode straight into the buffer
                self.loader.write_into(self.inputs.images)
        self.inputs.load(batch)
        if self.latent_inputs is not None:  # outside any graph: a host-seeded draw
            self.latent_inputs.load(batch, self.inputs.images, self.step_idx, samples=phase.generates,
                                    means=self.detects_with_latents and self._reads_batch_means(phase))
        set_trainable(self.model, phase)
        self.model.train()
        parts = self.graphs.run(phase.name, lambda: self._phase_step(phase))
        self.sums.count(phase.name)
        self.scheduler.step()  # host-side: fills the lr tensors in place under CUDA graphs
        self.step_idx += 1
        return {"phase": phase.name, **parts}

    def _phase_step(self, phase) -> dict[str, torch.Tensor]:
        """Loss, backward, gradient all-reduce and clipping, AdamW, EMA, counters and loss sums of one
        step of `phase`, on the static inputs: nothing here reads the device (CUDA-graph safe)."""
        cfg, x = self.cfg, self.inputs
        fakes, fake_latents = self.pool.draw(len(x.images), self.draws) if phase.uses_fake_pool else (None, None)
        with self.autocast:
            latents = self.latent_inputs.buffer if self.latent_inputs is not None and phase.generates else None
            det_latents = ((self.latent_inputs.means, fake_latents)
                           if self.detects_with_latents and self._reads_batch_means(phase) else None)
            terms = phase_loss(self.step_model, phase, x.images, x.is_fake, x.class_ids, fakes, cfg.loss, self.draws,
                               latents, augment=self.det_augment, det_latents=det_latents)
        self.optimizer.zero_grad(set_to_none=True)  # inside a capture: fresh gradients from the graph's pool
        if self.grad_buckets is not None:
            self.grad_buckets.begin()
        terms.total.backward()
        trained = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in trained]
        # data parallel: every rank now gets the global-batch gradient (FSDP has reduce-scattered the
        # averaged gradients to the shards already)
        if self.grad_buckets is not None:
            self.grad_buckets.finish()
        elif not self.fsdp:
            self.dist.average_(grads)
        if cfg.optim.grad_clip > 0:
            norm = full(torch.nn.utils.clip_grad_norm_(trained, cfg.optim.grad_clip, foreach=True))
            terms.parts["grad_norm"] = norm
        else:
            norm = full(torch.nn.utils.get_total_norm(grads, foreach=True))
        # 1.0 when the loss or a gradient is not finite: the fused AdamW then skips the update (moments
        # and step counts included) and the EMA does not move; all on the device, no host sync.
        found_inf = (~(torch.isfinite(terms.total.detach()) & torch.isfinite(norm))).float()
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        self.ema.update(self.model, skip=found_inf)
        self._bad_run.mul_(found_inf).add_(found_inf)  # (run + bad) * bad, in place
        self._skipped.add_(found_inf)
        self.sums.add(phase.name, terms.parts)
        return terms.parts

    def _utilisation(self, rate: float) -> dict[str, float]:
        """`mfu`: the model's FLOPs / s over the device's bf16 peak; with a VAE also `mfu_vae` (its
        encode / decode FLOPs) and `mfu_with_vae` (both). Empty where the peak is unknown (CPU)."""
        if not self._peak_flops:
            return {}
        out = {"mfu": rate * self._flops_per_sample / self._peak_flops}
        if self._vae_flops_per_sample:
            out["mfu_vae"] = rate * self._vae_flops_per_sample / self._peak_flops
            out["mfu_with_vae"] = out["mfu"] + out["mfu_vae"]
        return out

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far for a non-finite loss or gradient (reads the device counter)."""
        return int(self._skipped.item())

    @property
    def bad_steps(self) -> int:
        """Consecutive skipped steps up to now (reads the device counter)."""
        return int(self._bad_run.item())

    def check_health(self) -> None:
        """Report newly skipped steps; stop the run after train.max_bad_steps consecutive ones.

        Called every train.log_every steps and before each checkpoint (one host read of two device
        scalars), so a run of bad steps is noticed within log_every steps; skipped steps change
        nothing, and the checkpoint of the last good state is kept."""
        skipped, run = self.skipped_steps, self.bad_steps
        if skipped > self._skipped_reported:
            self.log(f"step {self.step_idx}: {skipped - self._skipped_reported} step(s) skipped since the last "
                     f"check for a non-finite loss or gradient ({skipped} in this run, {run} in a row now; "
                     f"limit train.max_bad_steps = {self.cfg.train.max_bad_steps} in a row)")
            self._skipped_reported = skipped
        if run >= self.cfg.train.max_bad_steps:
            kept = list_checkpoints(self.out_dir)
            raise TrainingError(f"{run} consecutive steps had a non-finite loss or gradient (up to step "
                                f"{self.step_idx}); stopping. Last good checkpoint: "
                                f"{kept[-1] if kept else 'none written yet'}")

    # ------------------------------------------------------------------ loop

    def train(self) -> dict:
        """Run until train.steps; log metrics, save checkpoints; returns the last logged metrics.

        SIGTERM / SIGINT finish the current step, save a checkpoint and return (resume continues);
        `self.stopped_by` then names the signal ('' after a finished run), and `unigendet train` exits
        with EXIT_STOPPED."""
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        metrics_path = self.out_dir / "metrics.jsonl"
        bar = tqdm(total=cfg.steps, initial=self.step_idx, disable=not cfg.progress or not self.dist.is_main,
                   dynamic_ncols=True)
        self.stopped_by = ""
        try:
            with stop_requests() as stop:
                last = self._loop(bar, metrics_path, stop)
        finally:
            self.loggers.close()
        bar.close()
        return last

    def _loop(self, bar, metrics_path: Path, stop: StopRequest) -> dict:
        cfg = self.cfg.train
        last: dict = {}
        t0, steps0 = time.perf_counter(), self.step_idx
        while self.step_idx < cfg.steps:
            phase = self.step()["phase"]
            if self.step_idx % cfg.log_every == 0 or self.step_idx == cfg.steps:
                self.check_health()
                elapsed = time.perf_counter() - t0
                # train.batch_size is per rank; samples/s counts every rank's samples
                rate = (self.step_idx - steps0) * cfg.batch_size * self.dist.world_size / max(elapsed, 1e-9)
                means = self.sums.means()  # {phase/part: mean since the last log}, device scalars
                values = torch.stack(list(means.values()))
                self.dist.average_([values])  # the global-batch value of each loss part
                last = {"step": self.step_idx, "phase": phase, "lr": float(self.scheduler.get_last_lr()[0]),
                        "samples_per_s": rate, "tokens_per_s": rate * self._tokens_per_sample,
                        "step_ms": 1e3 * elapsed / max(self.step_idx - steps0, 1),
                        **self._utilisation(rate),
                        "skipped_steps": self.skipped_steps,
                        **dict(zip(means, values.tolist()))}
                if self.dist.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    self.loggers.scalars(self.step_idx, last)
                bar.set_postfix(progress_fields(last), refresh=False)
                t0, steps0 = time.perf_counter(), self.step_idx
            bar.update(1)
            stopping = self.dist.any(stop.requested)  # ranks must agree on the step they stop after
            if self.loggers.enabled and (self.step_idx % (cfg.sample_every or cfg.save_every) == 0
                                         or self.step_idx == cfg.steps):
                self.log_samples()
            if self.step_idx % cfg.save_every == 0 or self.step_idx == cfg.steps or stopping:
                self.check_health()  # never checkpoint in the middle of a run of bad steps past the limit
                self.save()
            if stopping:
                self.log(f"{stop.signal_name}: stopped cleanly after step {self.step_idx}; continue with --resume")
                self.stopped_by = stop.signal_name or "a stop request of another rank"
                break
        return last

    def log_samples(self) -> None:
        """The EMA generator's sample grid (train.sample_every) to TensorBoard / W&B. Under FSDP every
        rank samples (the sharded forward needs them all); otherwise rank 0 alone."""
        if self.fsdp or self.dist.is_main:
            grid = sample_grid(self.ema.model, self.cfg, self.device, self.autocast)  # (H, W, 3) uint8
            self.loggers.image(self.step_idx, "samples", grid)

    # ------------------------------------------------------------------ checkpoints

    def _state(self, keep: bool) -> dict | None:
        """Everything but the weights; a collective under FSDP (the AdamW moments are gathered from
        the shards), returning None on ranks with keep=False."""
        optimizer = gather_state(self.optimizer.state_dict(), keep=keep)
        if not keep:
            return None
        scheduler = self.scheduler.state_dict()
        # learning rates as plain floats (device tensors under CUDA graphs): checkpoints resume either way
        for group in optimizer["param_groups"]:
            group.update({k: float(v) for k, v in group.items() if k in ("lr", "initial_lr")})
        for key in ("base_lrs", "_last_lr"):
            scheduler[key] = [float(v) for v in scheduler[key]]
        return {
            "optimizer": optimizer,
            "scheduler": scheduler,
            "ema": self.ema.state_dict(),
            "pool": self.pool.state_dict(),
            "data": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "noise": self.noise.get_state(),
                    **({"cuda": torch.cuda.get_rng_state()} if self.device.type == "cuda" else {})},
            "counters": {"bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps},
        }

    def save(self) -> Path:
        """Rank 0 writes the checkpoint. Data parallel: replicas are first checked bit-identical; FSDP:
        every rank takes part in gathering the shards into the full (single-process format) state."""
        if not self.fsdp and not self.dist.replicas_in_sync(list(self.model.parameters())):
            raise TrainingError(f"step {self.step_idx}: model replicas differ across ranks; not saving")
        path = self.out_dir / "checkpoints" / f"step_{self.step_idx:07d}"
        main = self.dist.is_main
        weights = gather_state(self.model.state_dict(), keep=main)
        ema_weights = gather_state(self.ema.model.state_dict(), keep=main)
        state = self._state(keep=main)
        if main:
            path = save_checkpoint(self.out_dir, self.step_idx, weights, ema_weights, state, self.cfg,
                                   keep_last=self.cfg.train.keep_last, vae=self.vae_record)
            self.log(f"saved checkpoint {path}")
            self.loggers.flush()  # the logs reach disk with each checkpoint
        self.dist.barrier()
        return path

    def _resume(self) -> None:
        ckpts = list_checkpoints(self.out_dir)
        if not ckpts:
            self.log(f"--resume: no checkpoint in {self.out_dir}, starting from scratch")
            return
        ckpt = ckpts[-1]
        saved = load_trainer_state(ckpt)
        old = to_dict(checkpoint_config(ckpt))["model"]
        # the VAE may have moved: its weights (check_vae, below) decide, not its path
        diff = {k: (old.get(k), v) for k, v in to_dict(self.cfg)["model"].items() if old.get(k) != v and k != "vae"}
        if diff:
            raise CheckpointError(f"{ckpt}: model config differs from the run's ({diff}); cannot resume")
        if self.vae is not None:
            check_vae(ckpt, self.vae_record)
        load_weights(ckpt, self.model, "model")
        load_weights(ckpt, self.ema.model, "ema")
        self.optimizer.load_state_dict(saved["optimizer"])
        shard_optimizer_state(self.optimizer)  # FSDP: the moments of this rank's shards
        if self.cuda_graphs:
            device_lrs(self.optimizer)  # the saved groups hold plain floats
        self.scheduler.load_state_dict(saved["scheduler"])
        self.ema.load_state_dict(saved["ema"])
        self.pool.set_step(int(saved["step"]))  # a pool saved without write stamps counts as written now
        self.pool.load_state_dict(saved["pool"])
        self.loader.load_state_dict(saved["data"])
        torch.set_rng_state(saved["rng"]["torch"])
        self.noise.set_state(saved["rng"]["noise"])
        if "cuda" in saved["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        self._bad_run.fill_(saved["counters"]["bad_steps"])
        self._skipped.fill_(saved["counters"]["skipped_steps"])
        self._skipped_reported = saved["counters"]["skipped_steps"]
        self.step_idx = int(saved["step"])
        self.log(f"resumed from {ckpt} at step {self.step_idx}")


def progress_fields(metrics: dict) -> dict[str, str]:
    """What the progress bar shows: phase, the main loss parts by name, samples/s."""
    shown = {"phase": metrics["phase"]}
    for key, value in metrics.items():
        if "/" in key and key.split("/")[1] in ("flow", "bce", "align", "auth"):
            shown[key.split("/")[1]] = f"{value:.3f}"
    shown["img/s"] = f"{metrics['samples_per_s']:.0f}"
    return shown


# Exit status of `unigendet train` stopped by SIGTERM / SIGINT after saving a resumable checkpoint:
# EX_TEMPFAIL of sysexits.h ("temporary failure, retry"), so a scheduler can requeue the job with
# --resume. Not 0 (the run is unfinished) and not 128 + signal, which shells report for a process
# the signal killed before it could save anything.
EXIT_STOPPED = 75


class StopRequest:
    """Set by a SIGTERM / SIGINT handler; the loop finishes its step, saves, and returns."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""


@contextlib.contextmanager
def stop_requests():
    """Route SIGTERM and SIGINT to a StopRequest while training (main thread only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        stop.requested, stop.signal_name = True, signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
