"""The fake pool: an on-device ring buffer of images from the EMA generator, for the det phase (and,
for a latent model with d2g, the latents its detection passes read beside each image)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rng import Gen, batch_rand

_NEVER = -(2**62)  # write step of a slot never filled: older than any age limit


class FakePool:
    """`images` (P, 3, S, S) on the device, each slot stamped with the optimizer step that wrote it.

    The trainer calls `set_step(step)` (host) before each step's refill and phase step; `add` stamps
    the images it writes with that step, and `draw` draws only from filled slots whose age
    (step - write step) is at most `max_age` (0 = no limit: every filled slot). The write position,
    the stamps and the current step are device tensors and the fill count a host int that depends
    only on how many images were added, so `add` and `draw` never read the device and keep static
    shapes: they can be captured in a CUDA graph (once the pool is full, their shapes stop changing).

    That `draw` has something to draw is the caller's side of the contract, kept on the host:
    `must_refill()` is true when the pool is empty or its newest images are older than `max_age`;
    the trainer refills then (besides its regular schedule), so the last refill always qualifies.

    latent_shape: (K, s, s) keeps `latents` (P, K, s, s) beside the images, written by `add` and drawn
    with the same slots by `draw`; None keeps images only.
    """

    def __init__(self, capacity: int, image_size: int, device, dtype=torch.float32, max_age: int = 0,
                 latent_shape: tuple[int, int, int] | None = None):
        if max_age < 0:
            raise ValueError(f"FakePool: max_age must be >= 0 (0 = no limit), got {max_age}")
        self.max_age = int(max_age)
        self.images = torch.zeros(capacity, 3, image_size, image_size, device=device, dtype=dtype)  # (P, 3, S, S)
        self.latents = None if latent_shape is None else torch.zeros(capacity, *latent_shape, device=device,
                                                                      dtype=dtype)  # (P, K, s, s)
        self.count = 0  # filled slots (host)
        self.step = 0  # current optimizer step (host copy of _now)
        self.newest = None  # step of the last add (host), None before the first
        self._ptr = torch.zeros((), device=device, dtype=torch.int64)  # next slot to overwrite (device)
        self._now = torch.zeros((), device=device, dtype=torch.int64)  # current optimizer step (device)
        self._written = torch.full((capacity,), _NEVER, device=device, dtype=torch.int64)  # (P,) write steps

    @property
    def capacity(self) -> int:
        return self.images.shape[0]

    def set_step(self, step: int) -> None:
        """Host side, outside any graph: the optimizer step about to run (writes the device clock)."""
        self.step = int(step)
        self._now.fill_(self.step)

    def must_refill(self) -> bool:
        """Host only: True when `draw` would find no slot young enough (empty, or the newest images
        are older than max_age at the current step)."""
        if self.count == 0 or self.newest is None:
            return True
        return self.max_age > 0 and self.step - self.newest > self.max_age

    def add(self, images: Tensor, latents: Tensor | None = None) -> None:
        """Write (n, 3, S, S) images (and their (n, K, s, s) latents, exactly when the pool keeps them) into
        the ring, overwriting the oldest, stamped with the current step."""
        if (latents is None) != (self.latents is None):
            raise ValueError("FakePool.add: latents must be given exactly when the pool keeps them "
                             f"(latent_shape {None if self.latents is None else tuple(self.latents.shape[1:])})")
        n = images.shape[0]
        idx = (self._ptr + torch.arange(n, device=self.images.device)) % self.capacity  # (n,)
        self.images.index_copy_(0, idx, images.to(self.images.dtype))
        if latents is not None:
            self.latents.index_copy_(0, idx, latents.to(self.latents.dtype))
        self._written.index_copy_(0, idx, self._now.expand(n))
        self._ptr.copy_((self._ptr + n) % self.capacity)
        self.count = min(self.capacity, self.count + n)
        self.newest = self.step

    def eligible(self) -> Tensor:
        """(P,) bool: the slots `draw` draws from (filled, and no older than max_age if set)."""
        filled = self._written != _NEVER
        if self.max_age == 0:
            return filled
        return filled & (self._now - self._written <= self.max_age)

    def draw(self, n: int, generator: Gen = None) -> tuple[Tensor, Tensor | None]:
        """(images (n, 3, S, S) drawn uniformly with replacement from the eligible slots, their latents
        (n, K, s, s) or None)."""
        idx = self._draw_slots(n, generator)
        return self.images[idx], None if self.latents is None else self.latents[idx]

    def _draw_slots(self, n: int, generator: Gen) -> Tensor:
        """(n,) slot indices, uniform with replacement over the eligible slots.

        Static shapes, no host read: u ~ U[0, 1) per draw picks the k-th eligible slot,
        k = floor(u * eligible count), found by a binary search in the running count."""
        if self.count == 0:
            raise RuntimeError("FakePool.draw: the pool is empty (refill it before the det phase)")
        running = self.eligible().cumsum(0)  # (P,) eligible slots up to and including each slot
        total = running[-1]  # () eligible count, >= 1 while the caller keeps must_refill() false
        u = batch_rand((n,), generator, device=self.images.device)  # (n,)
        k = torch.minimum((u * total).long(), total - 1)  # (n,) in [0, total)
        return torch.searchsorted(running, k, right=True)  # (n,) first slot whose running count exceeds k

    def state_dict(self) -> dict:
        state = {"images": self.images.cpu(), "count": self.count, "ptr": int(self._ptr.item()),
                 "written": self._written.cpu(), "step": self.step, "newest": self.newest}
        if self.latents is not None:
            state["latents"] = self.latents.cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore in place (captured graphs keep reading the same storage). A checkpoint from before
        the write stamps counts its filled slots as written at its current step ("step" if saved, else
        `set_step`'s value): their age starts over, so they serve until max_age steps after resuming."""
        if state["images"].shape != self.images.shape:
            raise ValueError(f"fake pool shape {tuple(state['images'].shape)} in the checkpoint does not match "
                             f"the configured {tuple(self.images.shape)} (phases.pool_size / data.image_size)")
        if self.latents is not None:
            saved = state.get("latents")
            if saved is None or saved.shape != self.latents.shape:
                raise ValueError(f"fake pool latents {None if saved is None else tuple(saved.shape)} in the checkpoint "
                                 f"do not match the configured {tuple(self.latents.shape)} (a latent model with "
                                 "model.d2g keeps them; was the checkpoint trained with another model.vae or d2g?)")
            self.latents.copy_(saved)
        self.images.copy_(state["images"])
        self.count = int(state["count"])
        self._ptr.fill_(int(state["ptr"]))
        self.set_step(int(state.get("step", self.step)))
        if "written" in state:
            self._written.copy_(state["written"])
            self.newest = state["newest"]
        else:  # the ring fills slots 0, 1, ... first: exactly the first `count` are filled
            self._written.fill_(_NEVER)
            self._written[: self.count] = self.step
            self.newest = self.step if self.count else None
