"""Data-parallel training across the processes `torchrun` starts: NCCL on GPU, gloo on CPU.

Each rank holds a full replica. After the backward pass the gradients of the parameters this phase
trains are averaged across ranks with one all-reduce of their flattened concatenation (the
semantics of DistributedDataParallel; the phases change which parameters train from step to step,
which DDP's fixed gradient buckets do not allow). The loaders and `unigendet.rng` shard samples and
randomness so that N ranks x B samples reproduce one process with N*B samples. Rank 0 logs and
writes checkpoints; the others wait at a barrier.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_(self, tensors: list[Tensor]) -> None:
        """In-place mean of `tensors` over ranks (one all-reduce of their concatenation)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (a host-side agreement, e.g. on stopping)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def replicas_in_sync(self, tensors: list[Tensor]) -> bool:
        """Whether every rank holds bit-identical `tensors` (compares a SHA-1 of their bytes)."""
        if not self.enabled:
            return True
        h = hashlib.sha1()
        for t in tensors:
            h.update(t.detach().float().cpu().numpy().tobytes())
        digests: list[str | None] = [None] * self.world_size
        dist.all_gather_object(digests, h.hexdigest())
        return len(set(digests)) == 1

    def _device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def init_distributed(device: torch.device) -> DistContext:
    """The context of this process: single-process unless WORLD_SIZE > 1 (set by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local)
