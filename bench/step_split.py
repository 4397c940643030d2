"""Where a latent training step's time goes: the VAE's encode and decode, the model, the optimizer.

    split = StepSplit(trainer)      # wraps a few methods of this trainer's objects (bench only)
    trainer.step(); ...
    split.means_ms(steps)           # {"vae_encode": ms, "vae_decode_fwd": ms, ...} per step

Explicit timers around the calls that matter, installed on the trainer's own instances, so the
trainer's code keeps no timer and no sync of its own; on a GPU every timer synchronises the device
(the bench's steps are timed with syncs anyway):
  vae_encode       FrozenVAE.encode_moments (training images encoded on the fly; 0 with packed latents) and,
                   with model.d2g, FrozenVAE.encode_latents' forward (the refill's samples, L_auth's
                   decoded x0_hat, augmented images; the input-gradient backward through the encoder
                   of L_auth runs inside the frozen detector's forward and counts as model)
  vae_decode_fwd   FrozenVAE.decode (L_auth's decode(x0_hat) and the refill's samples)
  vae_decode_bwd   the backward through the decoder: from the gradient reaching the decoded images
                   to the gradient reaching the latents (tensor hooks; autograd runs the decoder's
                   nodes together, as they are the newest of the graph)
  refill_model     Trainer._refill without its decode: the EMA generator's sampler passes
  optimizer        AdamW's step and the EMA update
  model            the rest of the step: data, the model's forward and backward, losses, clipping
"""
from __future__ import annotations

import functools
import time

import torch

PARTS = ("vae_encode", "vae_decode_fwd", "vae_decode_bwd", "refill_model", "optimizer", "model")


class StepSplit:
    def __init__(self, trainer):
        self.trainer = trainer
        self.device = trainer.device
        self.ms = dict.fromkeys(PARTS, 0.0)
        self.step_ms = 0.0
        self._open: dict[str, float] = {}
        vae = trainer.vae
        if vae is None:
            raise ValueError("StepSplit: the trainer has no VAE (model.vae is empty)")
        vae.encode_moments = self._timed("vae_encode", vae.encode_moments)
        vae.encode_latents = self._vae_call("vae_encode", vae.encode_latents)
        vae.decode = self._vae_call("vae_decode_fwd", vae.decode, then=self._hook_decoder_backward)
        trainer.optimizer.step = self._timed("optimizer", trainer.optimizer.step)
        trainer.ema.update = self._timed("optimizer", trainer.ema.update)
        trainer._refill = self._timed("refill_model", trainer._refill)
        trainer.step = self._timed("step", trainer.step)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add(self, part: str, seconds: float) -> None:
        if part == "step":
            self.step_ms += seconds * 1e3
        else:
            self.ms[part] += seconds * 1e3

    def _timed(self, part: str, fn):
        @functools.wraps(fn)  # keeps the marks others put on fn (the LR scheduler's on optimizer.step)
        def wrapper(*args, **kwargs):
            t0 = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(part, self._now() - t0)
        return wrapper

    def _vae_call(self, part: str, fn, then=None):
        """fn timed into `part`; a call without grad is the refill's (its time is the VAE's, not the
        sampler's); then(input, output) runs after (the decoder's backward hooks)."""
        def wrapper(x):
            t0 = self._now()
            y = fn(x)
            seconds = self._now() - t0
            self._add(part, seconds)
            if not torch.is_grad_enabled():
                self.ms["refill_model"] -= seconds * 1e3
            if then is not None:
                then(x, y)
            return y
        return wrapper

    def _hook_decoder_backward(self, latents, images):
        if images.requires_grad and latents.requires_grad:
            images.register_hook(self._start_backward)
            latents.register_hook(self._stop_backward)

    def _start_backward(self, grad):
        self._open["bwd"] = self._now()
        return grad

    def _stop_backward(self, grad):
        start = self._open.pop("bwd", None)
        if start is not None:
            self._add("vae_decode_bwd", self._now() - start)
        return grad

    def reset(self) -> None:
        """Forget what warm-up steps measured."""
        self.ms = dict.fromkeys(PARTS, 0.0)
        self.step_ms = 0.0

    def means_ms(self, steps: int) -> dict[str, float]:
        """ms per step of each part; `model` = the step's time not in another part."""
        parts = {k: v / steps for k, v in self.ms.items() if k != "model"}
        step = self.step_ms / steps
        return {**parts, "model": step - sum(parts.values()), "step": step}
