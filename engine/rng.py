"""Random draws along the batch dimension that data parallelism does not change.

Every random tensor of a training step whose first dimension is the batch (flow timesteps and
noise, label dropout, fake-pool indices) is drawn through `batch_randn` / `batch_rand` /
`batch_randint`. With a plain `torch.Generator` they are the usual draws. With a
`ShardedGenerator`, every rank holds the same seeded generator, draws the tensor for the *global*
batch and keeps its own rows `[rank::world_size]` - the same strided shard the data loaders give a
rank (`FolderLoader`: rank r takes `perm[r::world_size]`). N ranks with B samples each therefore see
exactly the images and randomness of one process with N * B samples, and averaged gradients equal
that process's gradients up to summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ShardedGenerator:
    generator: torch.Generator  # same seed and state on every rank
    rank: int = 0
    world_size: int = 1


Gen = torch.Generator | ShardedGenerator | None


def plain(generator: Gen) -> torch.Generator | None:
    """The underlying generator, for draws every rank makes in full (e.g. the fake-pool refill)."""
    return generator.generator if isinstance(generator, ShardedGenerator) else generator


def _draw(fn, shape: tuple[int, ...], generator: Gen, **kwargs) -> Tensor:
    if not isinstance(generator, ShardedGenerator) or generator.world_size == 1:
        return fn(shape, generator=plain(generator), **kwargs)
    g = generator
    full = fn((shape[0] * g.world_size, *shape[1:]), generator=g.generator, **kwargs)  # global batch
    return full[g.rank::g.world_size].contiguous()


def batch_randn(shape, generator: Gen, *, device, dtype=None) -> Tensor:
    return _draw(torch.randn, tuple(shape), generator, device=device, dtype=dtype)


def batch_rand(shape, generator: Gen, *, device) -> Tensor:
    return _draw(torch.rand, tuple(shape), generator, device=device)


def batch_randint(high: int, shape, generator: Gen, *, device) -> Tensor:
    return _draw(lambda s, **kw: torch.randint(0, high, s, **kw), tuple(shape), generator, device=device)
