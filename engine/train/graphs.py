"""CUDA graphs for the trainer (`train.cuda_graphs`): static buffers, device-side running sums, and a
runner that captures each phase step once and replays it.

What makes a step capturable, and how the trainer provides it (all of it on every device, so the
CPU tests run exactly the code the graphs capture):
- inputs live in static buffers (`StaticBatch`): each step copies the loader's batch into them;
- no host sync and no data-dependent shape inside the step: external fakes are weighted out of the
  generator losses instead of selected (engine/train/phases.py), skipped steps are a device flag
  (fused AdamW's `found_inf`), the EMA decay and the fake-pool write position are device tensors;
- values the host reads later accumulate in device buffers (`DeviceSums`) inside the step and are
  read every `train.log_every` steps;
- AdamW is `capturable` with tensor learning rates, which the schedule fills in place between steps.

`StepGraphs.run(key, fn)`: with graphs off, `fn()`. With graphs on, the first `warmup` calls of each
key run eagerly on a side stream (lazy initialisation: optimizer state, cuBLAS workspaces, autotuning),
the next one captures `fn` into a `torch.cuda.CUDAGraph` (noise generators registered, so replays
draw fresh random numbers) and replays it, and every later call only replays. One graph per key
(the trainer's keys: each phase's step and the fake-pool refill), each with its own memory pool.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from ..data import Batch


class StaticBatch:
    """Device buffers a captured step reads its batch from; `load` copies each new batch in."""

    def __init__(self, like: Batch, device):
        self.images = torch.empty_like(like.images, device=device)  # (B, 3, S, S)
        self.is_fake = torch.empty_like(like.is_fake, device=device)  # (B,)
        self.class_ids = torch.empty_like(like.class_ids, device=device)  # (B,)

    def load(self, batch: Batch) -> None:
        if batch.images.shape != self.images.shape:
            raise ValueError(f"batch of shape {tuple(batch.images.shape)} does not fit the static buffers "
                             f"{tuple(self.images.shape)}: loaders must yield fixed-size batches")
        if batch.images.data_ptr() != self.images.data_ptr():  # a loader may write here itself (DALI)
            self.images.copy_(batch.images, non_blocking=True)
        self.is_fake.copy_(batch.is_fake, non_blocking=True)
        self.class_ids.copy_(batch.class_ids, non_blocking=True)


class DeviceSums:
    """Running sums of named scalars on the device (inside the step) with host-side counts (outside it).

    `add(prefix, values)` creates a buffer per name on first use (an eager call, before any capture)
    and adds into it in place afterwards, so captured steps keep adding into the same memory.
    `means()` gives sum / count per name as device scalars and resets the sums (the caller reads them
    all at once: one host sync per log line).
    """

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.keys_of: dict[str, list[str]] = {}  # prefix -> its names, in first-seen order
        self.counts: Counter[str] = Counter()  # prefix -> values added since the last read (host)

    def add(self, prefix: str, values: dict[str, Tensor]) -> None:
        """Graph-safe once each name exists: in-place adds of detached fp32 scalars."""
        for name, value in values.items():
            key = f"{prefix}/{name}"
            buf = self.sums.get(key)
            if buf is None:
                buf = self.sums[key] = torch.zeros((), device=self.device, dtype=torch.float32)
                self.keys_of.setdefault(prefix, []).append(key)
            buf.add_(value.detach().float())

    def count(self, prefix: str) -> None:
        """Host side: one more set of values was added under `prefix` (call once per step, outside graphs)."""
        self.counts[prefix] += 1

    def means(self) -> dict[str, Tensor]:
        """{name: mean since the last read} as device scalars, for prefixes counted since; resets."""
        means = {key: self.sums[key] / n for prefix, n in self.counts.items() for key in self.keys_of[prefix]}
        for buf in self.sums.values():
            buf.zero_()
        self.counts.clear()
        return means


class StepGraphs:
    """Run graph-safe step functions eagerly, or capture each once and replay it (module docstring)."""

    def __init__(self, enabled: bool, *, warmup: int = 3, generators: tuple[torch.Generator, ...] = ()):
        if enabled and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.enabled = enabled
        self.warmup = max(1, int(warmup))
        self.generators = generators
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[str, object] = {}  # what the captured fn returned: static, rewritten by replays
        self.calls: Counter[str] = Counter()

    def captured(self, key: str) -> bool:
        return key in self.graphs

    def run(self, key: str, fn: Callable[[], object]):
        if not self.enabled:
            return fn()
        if key in self.graphs:
            self.graphs[key].replay()
            return self.outputs[key]
        self.calls[key] += 1
        if self.calls[key] <= self.warmup:
            return self._on_side_stream(fn)
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = fn()
        self.graphs[key], self.outputs[key] = graph, out
        graph.replay()  # capturing ran nothing: this replay is the step itself
        return out

    @staticmethod
    def _on_side_stream(fn: Callable[[], object]):
        """Warm-up call on a side stream, as the CUDA-graph recipe asks (lazy init off the capture stream)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out
