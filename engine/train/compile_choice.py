"""Whether a run compiles its steps: `train.compile` = true, false or "auto" (the default).

"auto" picks per device what `bench/bench_train_step.py` measured fastest over a whole run, compile
time included (docs/profile.md):
- CPU: with the fused backends the compiled step is 5-8% faster than the eager one (tiny_cpu,
  AMD EPYC VM, 2 threads, two days: 107.9 vs 113.6 ms, 126.3 vs 137.0 ms), while the first step of
  each phase and the first refill pay 10-30 s of compilation (less once inductor's cache holds the
  graphs). That pays off only for long runs, so auto compiles from `CPU_COMPILE_MIN_STEPS` steps on.
- CUDA: the engine's own launch-overhead remedy is `train.cuda_graphs`; auto leaves compiling off
  there (set train.compile = true to compile, compare both with bench_train_step's GPU rows).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import TrainConfig

CPU_COMPILE_MIN_STEPS = 5000  # ~2x the break-even of the measurement above: 15 s / (5% of 110 ms)


def compile_choice(train: TrainConfig, device_type: str) -> tuple[bool, str]:
    """(compile the steps?, why) for a run of `train` on a device of `device_type` ("cpu", "cuda")."""
    if isinstance(train.compile, bool):
        return train.compile, f"train.compile = {str(train.compile).lower()}"
    if train.cuda_graphs:
        return False, "auto: train.cuda_graphs is on (the two are alternatives)"
    if device_type == "cuda":
        return False, ("auto: on CUDA the fused kernels with train.cuda_graphs are the engine's fast path; "
                       "set train.compile = true to compile instead")
    if train.steps >= CPU_COMPILE_MIN_STEPS:
        return True, (f"auto: {train.steps} steps >= {CPU_COMPILE_MIN_STEPS} on CPU: the compiled step's 5-8% "
                      "pays for its compilation")
    return False, (f"auto: {train.steps} steps < {CPU_COMPILE_MIN_STEPS} on CPU: compiling (10-30 s per phase "
                   "and refill size) would cost more than its 5-8% per step saves")


def auto_rule(device_type: str) -> str:
    """What `train.compile = "auto"` does on a device of `device_type`, in one line (`unigendet info`)."""
    if device_type == "cuda":
        return "off on CUDA (train.cuda_graphs is the engine's fast path there)"
    return f"on for runs of >= {CPU_COMPILE_MIN_STEPS} steps on CPU, off for shorter ones"


def persistent_compile_cache() -> str:
    """The folder inductor keeps its compiled artefacts in (FX graph and AOTAutograd caches, on by default
    in torch 2.13), made persistent: torch's default is a folder under /tmp, which a reboot empties, so
    unless TORCHINDUCTOR_CACHE_DIR names one, the user's cache folder ($XDG_CACHE_HOME, else ~/.cache)
    gets unigendet/torchinductor. Call before the first compile; returns the folder."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base) / "unigendet" / "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
