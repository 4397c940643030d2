"""The fake pool: an on-device ring buffer of images from the EMA generator, for the det phase."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rng import Gen, batch_rand

_NEVER = -(2**62)  # write step of a slot never filled: older than any age limit


class FakePool:
    """`images` (P, 3, S, S) on the device, each slot stamped with the optimizer step that wrote it.

    The trainer calls `set_step(step)` (host) before each step's refill and phase step; `add` stamps
    the images it writes with that step, and `sample` draws only from filled slots whose age
    (step - write step) is at most `max_age` (0 = no limit: every filled slot). The write position,
    the stamps and the current step are device tensors and the fill count a host int that depends
    only on how many images were added, so `add` and `sample` never read the device and keep static
    shapes: they can be captured in a CUDA graph (once the pool is full, their shapes stop changing).

    That `sample` has something to draw is the caller's side of the contract, kept on the host:
    `must_refill()` is true when the pool is empty or its newest images are older than `max_age`;
    the trainer refills then (besides its regular schedule), so the last refill always qualifies.
    """

    def __init__(self, capacity: int, image_size: int, device, dtype=torch.float32, max_age: int = 0):
        if max_age < 0:
            raise ValueError(f"FakePool: max_age must be >= 0 (0 = no limit), got {max_age}")
        self.max_age = int(max_age)
        self.images = torch.zeros(capacity, 3, image_size, image_size, device=device, dtype=dtype)  # (P, 3, S, S)
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
        """Host only: True when `sample` would find no slot young enough (empty, or the newest images
        are older than max_age at the current step)."""
        if self.count == 0 or self.newest is None:
            return True
        return self.max_age > 0 and self.step - self.newest > self.max_age

    def add(self, images: Tensor) -> None:
        """Write (n, 3, S, S) images into the ring, overwriting the oldest, stamped with the current step."""
        n = images.shape[0]
        idx = (self._ptr + torch.arange(n, device=self.images.device)) % self.capacity  # (n,)
        self.images.index_copy_(0, idx, images.to(self.images.dtype))
        self._written.index_copy_(0, idx, self._now.expand(n))
        self._ptr.copy_((self._ptr + n) % self.capacity)
        self.count = min(self.capacity, self.count + n)
        self.newest = self.step

    def eligible(self) -> Tensor:
        """(P,) bool: the slots `sample` draws from (filled, and no older than max_age if set)."""
        filled = self._written != _NEVER
        if self.max_age == 0:
            return filled
        return filled & (self._now - self._written <= self.max_age)

    def sample(self, n: int, generator: Gen = None) -> Tensor:
        """(n, 3, S, S) images drawn uniformly with replacement from the eligible slots.

        Static shapes, no host read: u ~ U[0, 1) per draw picks the k-th eligible slot,
        k = floor(u * eligible count), found by a binary search in the running count."""
        if self.count == 0:
            raise RuntimeError("FakePool.sample: the pool is empty (refill it before the det phase)")
        running = self.eligible().cumsum(0)  # (P,) eligible slots up to and including each slot
        total = running[-1]  # () eligible count, >= 1 while the caller keeps must_refill() false
        u = batch_rand((n,), generator, device=self.images.device)  # (n,)
        k = torch.minimum((u * total).long(), total - 1)  # (n,) in [0, total)
        idx = torch.searchsorted(running, k, right=True)  # (n,) first slot whose running count exceeds k
        return self.images[idx]

    def state_dict(self) -> dict:
        return {"images": self.images.cpu(), "count": self.count, "ptr": int(self._ptr.item()),
                "written": self._written.cpu(), "step": self.step, "newest": self.newest}

    def load_state_dict(self, state: dict) -> None:
        """Restore in place (captured graphs keep reading the same storage). A checkpoint from before
        the write stamps counts its filled slots as written at its current step ("step" if saved, else
        `set_step`'s value): their age starts over, so they serve until max_age steps after resuming."""
        if state["images"].shape != self.images.shape:
            raise ValueError(f"fake pool shape {tuple(state['images'].shape)} in the checkpoint does not match "
                             f"the configured {tuple(self.images.shape)} (phases.pool_size / data.image_size)")
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
