"""The phases of training and the modes that schedule them, as data (docs/design.md §1).

One table answers every question about a phase (does it generate, detect, read the fake pool, train
the detector ...) and one maps each `phases.mode` to the phases it cycles through. The config takes
its `phases.mode` choices and cross-field checks from here, the trainer whether to keep a fake pool,
engine/train/phases.py the losses of each phase. Standard library only, so the config imports it
without pulling in torch or the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

PhaseMode = Literal["alternate", "joint", "diga"]
PHASE_MODES: tuple[PhaseMode, ...] = get_args(PhaseMode)


@dataclass(frozen=True)
class Phase:
    """One kind of optimizer step: which loss terms it computes and which parameters it updates."""
    name: str
    generates: bool             # computes the L_gen terms (flow, DIGA alignment and authenticity)
    detects: bool               # computes the L_det terms (BCE on real, external and fake-pool images)
    trainable: frozenset[str]   # parameter owners ("gen", "det", "shared") this phase updates

    @property
    def uses_fake_pool(self) -> bool:
        """Its detection terms score images of the fake pool as fakes."""
        return self.detects

    @property
    def trains_generator(self) -> bool:
        return "gen" in self.trainable

    @property
    def trains_detector(self) -> bool:
        """Updates detector-owned weights; when its generation pass also reads them (g2d), L_auth
        must see them as constants (engine/train/phases.py, authenticity_logit)."""
        return "det" in self.trainable

    @property
    def trains_shared(self) -> bool:
        """Updates the weights both streams use (all block weights under model.experts = 'shared')."""
        return "shared" in self.trainable


PHASES = {
    "gen": Phase("gen", generates=True, detects=False, trainable=frozenset({"gen", "shared"})),
    "det": Phase("det", generates=False, detects=True, trainable=frozenset({"det", "shared"})),
    "joint": Phase("joint", generates=True, detects=True, trainable=frozenset({"gen", "det", "shared"})),
    "diga": Phase("diga", generates=True, detects=False, trainable=frozenset({"gen"})),
}

# mode -> the phases it cycles through, each for phases.k steps: alternate = [(gen, k), (det, k)];
# joint is the published stage I, diga stage II (the generator trained against a frozen detector)
SCHEDULES: dict[PhaseMode, tuple[Phase, ...]] = {
    "alternate": (PHASES["gen"], PHASES["det"]),
    "joint": (PHASES["joint"],),
    "diga": (PHASES["diga"],),
}


def schedule(mode: str) -> tuple[Phase, ...]:
    """The phases `mode` cycles through (a `phases.mode` value)."""
    try:
        return SCHEDULES[mode]
    except KeyError:
        raise ValueError(f"unknown phases.mode {mode!r}; expected one of {PHASE_MODES}") from None


def phase_at(step: int, mode: str, k: int) -> Phase:
    """The phase of optimizer step `step` (0-based): the mode's phases in a loop, k steps each."""
    phases = schedule(mode)
    return phases[(step // k) % len(phases)]


def mode_uses_fake_pool(mode: str) -> bool:
    """Whether a run in `mode` keeps a fake pool: some phase of it reads one."""
    return any(p.uses_fake_pool for p in schedule(mode))


def mode_trains_shared(mode: str) -> bool:
    """Whether some phase of `mode` updates the weights both streams use."""
    return any(p.trains_shared for p in schedule(mode))
