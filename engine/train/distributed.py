"""Data-parallel training across the processes `torchrun` starts: NCCL on GPU, gloo on CPU.

Each rank holds a full replica, and the gradients of the parameters a phase trains are averaged
across ranks: the semantics of DistributedDataParallel, whose fixed gradient buckets do not allow
the phases' changing sets of trained parameters. `GradientBuckets` does it as DDP does, overlapped
with the backward pass: buckets of about `bucket_mb` are formed per set of trained parameters (in
reverse model order, roughly the order their gradients appear), and each is all-reduced as soon as
its gradients are in, launched strictly in bucket order so that every rank issues the same
collectives in the same order. Inside a CUDA graph the step uses `DistContext.average_` instead (one
all-reduce after the backward pass, captured with the step). The loaders and `unigendet.rng` shard
samples and randomness so that N ranks x B samples reproduce one process with N*B samples. Rank 0
logs and writes checkpoints; the others wait at a barrier.
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


class GradientBuckets:
    """Average gradients across ranks while the backward pass runs (data parallel).

        buckets = GradientBuckets(model.parameters(), world_size, bucket_mb=25)
        buckets.begin()        # before backward: lay out the buckets of the parameters that require grad
        loss.backward()        # each bucket is all-reduced (async) once all its gradients are in
        buckets.finish()       # launch the rest, wait, write the averages back into .grad

    A parameter can require grad and still get none (a loss term switched off leaves its module
    unused). Each layout remembers which of its parameters got a gradient last time and waits only
    for those, so an unused parameter does not hold its bucket back; its .grad stays None. A gradient
    that arrives after its bucket went out (a parameter unused last time, used now) is all-reduced
    in `finish`. Every rank runs the same graph, so all of this happens alike on every rank."""

    def __init__(self, params, world_size: int, bucket_mb: float = 25.0):
        self.params = list(params)
        self.world_size = world_size
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self._layouts: dict[tuple[int, ...], list[list[Tensor]]] = {}
        self._expected: dict[tuple[int, ...], set[int]] = {}  # per layout: ids that got a gradient last time
        self._active = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _layout(self) -> tuple[tuple[int, ...], list[list[Tensor]]]:
        """Buckets of the parameters that require grad now, last parameters first."""
        trained = [p for p in reversed(self.params) if p.requires_grad]
        key = tuple(id(p) for p in trained)
        if key not in self._layouts:
            buckets, size = [[]], 0
            for p in trained:
                if buckets[-1] and size + p.numel() * 4 > self.bucket_bytes:
                    buckets.append([])
                    size = 0
                buckets[-1].append(p)
                size += p.numel() * 4  # averaged in fp32
            self._layouts[key] = [b for b in buckets if b]
            self._expected[key] = set(key)
        return key, self._layouts[key]

    def begin(self) -> None:
        self._key, self.buckets = self._layout()
        expected = self._expected[self._key]
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        # gradients still to come, per bucket; a bucket expecting none is never sent
        self._waiting = [sum(id(p) in expected for p in bucket) for bucket in self.buckets]
        self._sent: list[tuple[list[Tensor], Tensor, object]] = []  # (params, flat gradients, async work)
        self._late: list[Tensor] = []
        self._next = 0  # the next bucket to launch: buckets go out in order
        self._active = True
        self._advance()

    def _on_grad(self, p: Tensor) -> None:
        if not self._active or id(p) not in self._bucket_of:
            return
        i = self._bucket_of[id(p)]
        if i < self._next:  # its bucket is out already
            self._late.append(p)
            return
        if id(p) in self._expected[self._key]:
            self._waiting[i] -= 1
        self._advance()

    def _advance(self) -> None:
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        self._send([p for p in self.buckets[i] if p.grad is not None])  # (none: on no rank either)
        self._next = i + 1

    def _send(self, params: list[Tensor]) -> None:
        if params:
            flat = torch.cat([p.grad.reshape(-1).float() for p in params])
            self._sent.append((params, flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """After backward: launch the buckets still held back, wait for all, store the averages."""
        self._active = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        self._send(self._late)  # (no parameter is in two sends: a late one had no gradient at its launch)
        for params, flat, work in self._sent:
            work.wait()
            flat /= self.world_size
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self._expected[self._key] = {id(p) for bucket in self.buckets for p in bucket if p.grad is not None}
        self._sent, self._late = [], []


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
