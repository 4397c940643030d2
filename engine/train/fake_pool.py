"""The fake pool: an on-device ring buffer of images from the EMA generator, for the det phase."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rng import Gen, batch_randint


class FakePool:
    """`images` (P, 3, S, S) on the device. The write position is a device tensor and the fill count a
    host int that depends only on how many images were added, so `add` and `sample` never read the
    device and can be captured in a CUDA graph (once the pool is full, their shapes stop changing)."""

    def __init__(self, capacity: int, image_size: int, device, dtype=torch.float32):
        self.images = torch.zeros(capacity, 3, image_size, image_size, device=device, dtype=dtype)  # (P, 3, S, S)
        self.count = 0  # filled slots (host)
        self._ptr = torch.zeros((), device=device, dtype=torch.int64)  # next slot to overwrite (device)

    @property
    def capacity(self) -> int:
        return self.images.shape[0]

    def add(self, images: Tensor) -> None:
        """Write (n, 3, S, S) images into the ring, overwriting the oldest."""
        n = images.shape[0]
        idx = (self._ptr + torch.arange(n, device=self.images.device)) % self.capacity  # (n,)
        self.images.index_copy_(0, idx, images.to(self.images.dtype))
        self._ptr.copy_((self._ptr + n) % self.capacity)
        self.count = min(self.capacity, self.count + n)

    def sample(self, n: int, generator: Gen = None) -> Tensor:
        """(n, 3, S, S) images drawn uniformly with replacement from the filled slots."""
        if self.count == 0:
            raise RuntimeError("FakePool.sample: the pool is empty (refill it before the det phase)")
        idx = batch_randint(self.count, (n,), generator, device=self.images.device)
        return self.images[idx]

    def state_dict(self) -> dict:
        return {"images": self.images.cpu(), "count": self.count, "ptr": int(self._ptr.item())}

    def load_state_dict(self, state: dict) -> None:
        if state["images"].shape != self.images.shape:
            raise ValueError(f"fake pool shape {tuple(state['images'].shape)} in the checkpoint does not match "
                             f"the configured {tuple(self.images.shape)} (phases.pool_size / data.image_size)")
        self.images.copy_(state["images"])
        self.count = int(state["count"])
        self._ptr.fill_(int(state["ptr"]))
