"""The fake pool (engine/train/fake_pool.py): the det phase never draws a fake older than
phases.max_fake_age steps, nor an unfilled slot; the state round-trips (also from checkpoints without
write stamps); add / sample stay CUDA-graph safe (no host reads, static storage)."""
from __future__ import annotations

import pytest
import torch

from test_graphs import host_reads_forbidden
from unigendet import ConfigError, load_config
from unigendet.phase_modes import phase_at
from unigendet.train import FakePool, Trainer


def stamped(n: int, value: float) -> torch.Tensor:
    """(n, 3, 2, 2) images whose every pixel is `value` (the step that wrote them, or a marker)."""
    return torch.full((n, 3, 2, 2), float(value))


def det_ages(pool_size=256, refill_every=40, refill_count=32, max_age=120, steps=2000, batch=16, seed=0):
    """The trainer's refill / sample schedule (alternate mode, k=1) on a pool whose images hold their
    write step: the ages (steps) of every fake the det phase draws, as a (draws,) tensor."""
    pool = FakePool(pool_size, 2, "cpu", max_age=max_age)
    g = torch.Generator().manual_seed(seed)
    ages = []
    for step in range(steps):
        pool.set_step(step)
        if pool.must_refill() or step % refill_every == 0:
            pool.add(stamped(pool_size if pool.count == 0 else refill_count, step))
        if phase_at(step, "alternate", 1).uses_fake_pool:
            ages.append(step - pool.draw(batch, g)[0][:, 0, 0, 0])
    return torch.cat(ages)


def test_tiny_cpu_schedule_keeps_fakes_recent():
    """tiny_cpu's pool settings: every drawn fake is <= max_fake_age steps old; without the limit the
    untrained generator's first fill is drawn for hundreds of steps."""
    p = load_config("tiny_cpu").phases
    assert p.max_fake_age > 0
    ages = det_ages(p.pool_size, p.refill_every, p.refill_count, p.max_fake_age)
    assert ages.max() <= p.max_fake_age and ages.min() >= 0
    assert ages.mean() < 0.6 * p.max_fake_age, ages.mean()
    unlimited = det_ages(p.pool_size, p.refill_every, p.refill_count, 0)
    assert unlimited.max() >= p.pool_size // p.refill_count * p.refill_every - 1  # 319 for tiny_cpu
    assert unlimited.mean() > 2 * ages.mean()


@pytest.mark.parametrize("pool_size, refill_every, refill_count, max_age",
                         [(16, 2, 8, 2), (64, 5, 4, 5), (64, 3, 16, 7), (10, 1, 3, 1)])
def test_age_bound_holds_over_other_schedules(pool_size, refill_every, refill_count, max_age):
    ages = det_ages(pool_size, refill_every, refill_count, max_age, steps=300, batch=8)
    assert 0 <= ages.min() and ages.max() <= max_age


def test_sample_draws_only_filled_young_slots_uniformly():
    pool = FakePool(8, 2, "cpu", max_age=10)
    pool.set_step(0)
    pool.add(stamped(3, 7.0))  # slots 0-2 at step 0; slots 3-7 unfilled (zeros, never drawn)
    g = torch.Generator().manual_seed(1)
    for step in (0, 10):
        pool.set_step(step)
        assert not pool.must_refill()
        drawn = pool.draw(600, g)[0][:, 0, 0, 0]
        assert torch.equal(drawn, torch.full((600,), 7.0))
    pool = FakePool(8, 2, "cpu", max_age=10)
    for step, marker in ((0, 1.0), (4, 2.0), (9, 3.0)):  # slots 0-1, 2-3, 4-5; slots 6-7 unfilled
        pool.set_step(step)
        pool.add(stamped(2, marker))
    pool.set_step(12)  # step 0's images are 12 old: only markers 2 and 3 may be drawn
    drawn = pool.draw(4000, g)[0][:, 0, 0, 0]
    counts = {m: int((drawn == m).sum()) for m in (0.0, 1.0, 2.0, 3.0)}
    assert counts[0.0] == 0 and counts[1.0] == 0, counts
    assert 1800 < counts[2.0] < 2200 and counts[2.0] + counts[3.0] == 4000, counts  # uniform over 4 slots
    pool.set_step(20)  # all older than 10 now: the host says refill before sampling
    assert pool.must_refill()
    pool.add(stamped(2, 4.0))  # slots 6-7
    assert not pool.must_refill() and torch.equal(pool.draw(50, g)[0][:, 0, 0, 0], torch.full((50,), 4.0))


def test_no_limit_draws_every_filled_slot():
    pool = FakePool(6, 2, "cpu", max_age=0)
    pool.set_step(0)
    pool.add(torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 3, 2, 2))
    pool.set_step(10_000)
    assert not pool.must_refill()
    drawn = pool.draw(2000, torch.Generator().manual_seed(0))[0][:, 0, 0, 0]
    assert set(drawn.tolist()) == {1.0, 2.0, 3.0, 4.0}  # slots 4-5 (zeros) are unfilled


def test_state_round_trip_is_exact_and_in_place():
    a = FakePool(8, 2, "cpu", max_age=6)
    for step in range(0, 12, 3):
        a.set_step(step)
        a.add(torch.rand(3, 3, 2, 2))
    b = FakePool(8, 2, "cpu", max_age=6)
    storage = [t.data_ptr() for t in (b.images, b._written, b._now, b._ptr)]
    b.load_state_dict(a.state_dict())
    assert [t.data_ptr() for t in (b.images, b._written, b._now, b._ptr)] == storage  # graphs keep reading these
    assert (b.count, b.step, b.newest) == (a.count, a.step, a.newest) == (8, 9, 9)
    for x, y in ((a.images, b.images), (a._written, b._written), (a._now, b._now), (a._ptr, b._ptr)):
        assert torch.equal(x, y)
    for step in (10, 14):
        a.set_step(step), b.set_step(step)
        ga, gb = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        assert torch.equal(a.draw(32, ga)[0], b.draw(32, gb)[0])
        assert not a.must_refill() and not b.must_refill()  # the newest, from step 9, are <= 6 old
    a.set_step(16), b.set_step(16)
    assert a.must_refill() and b.must_refill()  # 7 old


def test_checkpoint_without_write_stamps_loads_as_written_at_resume():
    """A pool state saved before the stamps existed ({images, count, ptr}): its filled slots (the
    first `count`: the ring fills 0, 1, ... first) count as written at the resume step."""
    old = {"images": stamped(8, 5.0), "count": 5, "ptr": 5}
    pool = FakePool(8, 2, "cpu", max_age=4)
    pool.set_step(100)  # the trainer sets the checkpoint's step first
    pool.load_state_dict(old)
    assert pool.count == 5 and pool.newest == 100 and int(pool._ptr) == 5
    assert pool._written[:5].tolist() == [100] * 5 and bool(pool.eligible()[:5].all())
    assert not bool(pool.eligible()[5:].any())  # never filled: never drawn
    pool.set_step(104)
    assert not pool.must_refill()
    pool.set_step(105)
    assert pool.must_refill()
    empty = FakePool(8, 2, "cpu", max_age=4)
    empty.load_state_dict({"images": torch.zeros(8, 3, 2, 2), "count": 0, "ptr": 0})
    assert empty.must_refill() and empty.newest is None


def test_add_and_sample_are_graph_safe():
    """What the CUDA graphs capture (the refill's add, the det step's sample) reads no tensor value on
    the host and keeps its storage; only set_step, outside the graphs, writes the clock."""
    pool = FakePool(8, 2, "cpu", max_age=3)
    pool.set_step(0)
    pool.add(stamped(8, 0))  # the first fill runs eagerly
    storage = [t.data_ptr() for t in (pool.images, pool._written, pool._now, pool._ptr)]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        pool.set_step(step)
        with host_reads_forbidden():
            if step % 2 == 0:
                pool.add(stamped(4, step))
            drawn = pool.draw(16, g)[0]
        assert bool((step - drawn[:, 0, 0, 0] <= 3).all())
    assert [t.data_ptr() for t in (pool.images, pool._written, pool._now, pool._ptr)] == storage


def test_config_refuses_a_limit_below_the_refill_interval():
    cfg = load_config("tiny_cpu", ["--phases.refill_every=10", "--phases.max_fake_age=10"])
    assert cfg.phases.max_fake_age == 10
    assert load_config("tiny_cpu", ["--phases.max_fake_age=0"]).phases.max_fake_age == 0
    for bad in ("9", "-1"):
        with pytest.raises(ConfigError, match="phases.max_fake_age"):
            load_config("tiny_cpu", ["--phases.refill_every=10", f"--phases.max_fake_age={bad}"])


def test_trainer_draws_only_recent_fakes(tiny_overrides):
    """The trainer sets the pool's clock every step and refills on schedule: at every step the
    eligible slots are young enough and there is at least one; at odd steps from 3 on, the refill of
    two steps before (3 old) has expired and only the newest (1 old) serves."""
    cfg = load_config("tiny_cpu", tiny_overrides + ["--train.steps=8", "--phases.refill_every=2",
                                                    "--phases.max_fake_age=2", "--model.num_classes=0"])
    t = Trainer(cfg, log=lambda *_: None)
    assert t.pool.max_age == 2 and t.pool.capacity == 16 and cfg.phases.refill_count == 8
    for step in range(8):
        t.step()
        assert int(t.pool._now) == step
        young = t.pool.eligible()  # (16,)
        assert bool(((t.pool._now - t.pool._written)[young] <= 2).all())
        assert int(young.sum()) == (16 if step < 2 or step % 2 == 0 else 8), step  # step 0: one fill of 16
