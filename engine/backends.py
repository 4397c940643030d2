"""The only place a backend is chosen for a fused op.

Each op has an ordered list of candidate backends (fastest first). A candidate has a *capability
check*: given the op's inputs it returns None when it can run them, or a short reason why not
("no CUDA device", "module unigendet._C not built", "dtype float64 unsupported", ...).

Selection for one call:
  1. the environment variable `UNIGENDET_BACKEND` (e.g. `reference`) forces a backend for every op;
  2. else the `backend=` argument of the call, unless it is "auto";
  3. else the process default set by `set_default_backend` (the `ops.backend` config key);
  4. "auto" takes the first candidate whose check passes.
Naming a backend that cannot run raises `BackendError` listing the reason for every candidate. A
process-wide choice (1 or 3, e.g. `ops.backend = "ext"`) applies to the ops that have that backend
on the inputs' device; ops that do not implement it there (swiglu has no "triton"; attention's "ext"
serves CPU tensors only, its CUDA kernels being Triton's) choose as for "auto".
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

# The one list of backend names, in the order "auto" tries them: the fused backends first, the eager
# reference (which always runs) last. The `ops.backend` config key, the registrations in engine/ops/
# and `unigendet info` all take their names from here. "sdpa" (attention only) composes PyTorch's fused
# CPU attention kernel; it comes after the extension and Triton, which win where they run.
Backend = Literal["triton", "ext", "sdpa", "reference"]
BACKEND_NAMES: tuple[Backend, ...] = get_args(Backend)
BackendChoice = Literal["auto", Backend]  # what a call or the `ops.backend` key may ask for
BACKEND_CHOICES: tuple[str, ...] = get_args(BackendChoice)
ENV_VAR = "UNIGENDET_BACKEND"

CapabilityCheck = Callable[..., "str | None"]


class BackendError(RuntimeError):
    """A named backend cannot run these inputs; the message says why for each candidate."""


@dataclass(frozen=True)
class Candidate:
    name: Backend
    impl: Callable
    check: CapabilityCheck  # (*args, **kwargs) -> None if it can run, else a reason
    auto_check: CapabilityCheck | None = None  # extra condition for "auto" (e.g. not the slow interpreter)
    devices: tuple[str, ...] | None = None  # device types it implements (None: every one)


_REGISTRY: dict[str, list[Candidate]] = {}
_default_backend: BackendChoice = "auto"


def register(op: str, name: Backend, impl: Callable, check: CapabilityCheck | None = None,
             auto_check: CapabilityCheck | None = None, devices: tuple[str, ...] | None = None) -> None:
    """Add a backend for `op` ("auto" tries an op's backends in the order of BACKEND_NAMES).

    check: can this backend run these inputs at all (None = yes, else the reason)?
    auto_check: should "auto" pick it for these inputs (e.g. Triton under the CPU interpreter can
    run, so `backend="triton"` works in tests, but is far too slow for "auto" to choose)?
    devices: the device types this backend implements the op on (None: all); a process-wide choice
    of this backend does not apply to inputs on other devices.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {name!r}; expected one of {BACKEND_NAMES}")
    cands = _REGISTRY.setdefault(op, [])
    cands[:] = [c for c in cands if c.name != name]
    cands.append(Candidate(name, impl, check or (lambda *a, **k: None), auto_check, devices))
    cands.sort(key=lambda c: BACKEND_NAMES.index(c.name))


def set_default_backend(name: BackendChoice) -> None:
    """Process-wide default used when a call says backend="auto" (the `ops.backend` config key)."""
    global _default_backend
    if name not in BACKEND_CHOICES:
        raise BackendError(f"unknown backend {name!r}; expected one of {BACKEND_CHOICES}")
    _default_backend = name


def get_default_backend() -> BackendChoice:
    return _default_backend


def _requested(backend: BackendChoice) -> tuple[str, str]:
    """(name, where it came from) after applying the override order of the module docstring."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        return forced, f"${ENV_VAR}"
    if backend != "auto":
        return backend, "backend="
    return _default_backend, "ops.backend"


def select(op: str, backend: BackendChoice, *args: Any, **kwargs: Any) -> Callable:
    """The implementation of `op` to call for these inputs (see the module docstring)."""
    cands = _REGISTRY.get(op)
    if not cands:
        raise BackendError(f"no backend registered for op {op!r}")
    name, source = _requested(backend)
    if source != "backend=" and name in BACKEND_NAMES and not any(
            c.name == name and (c.devices is None or _device_type(args) in c.devices) for c in cands):
        name = "auto"  # a process-wide choice for the ops that have that backend there (module docstring)
    if name == "auto":
        reasons = []
        for c in cands:
            why = c.check(*args, **kwargs)
            if why is None and c.auto_check is not None:
                why = c.auto_check(*args, **kwargs)
            if why is None:
                return c.impl
            reasons.append(f"{c.name}: {why}")
        raise BackendError(f"{op}: no backend can run these inputs ({'; '.join(reasons)})")
    if name not in BACKEND_NAMES:
        raise BackendError(f"{op}: unknown backend {name!r} (from {source}); expected one of {BACKEND_CHOICES}")
    for c in cands:
        if c.name == name:
            why = c.check(*args, **kwargs)
            if why is None:
                return c.impl
            raise BackendError(f"{op}: backend {name!r} (from {source}) cannot run these inputs: {why}. "
                               f"{_report_line(op)}")
    raise BackendError(f"{op}: backend {name!r} (from {source}) is not available: "
                       f"{_unavailable.get((op, name), 'not implemented for this op')}. {_report_line(op)}")


def _device_type(args: tuple) -> str | None:
    """The device type of the first tensor among an op's inputs (None if it has none)."""
    for a in args:
        if hasattr(a, "device"):
            return a.device.type
    return None


def _report_line(op: str) -> str:
    return "Backends for this op: " + ", ".join(
        f"{n} ({why})" for n, why in availability()[op].items()
    )


# Backends that exist in the design but are not present in this build, with the reason.
_unavailable: dict[tuple[str, str], str] = {}


def mark_unavailable(op: str, name: Backend, reason: str) -> None:
    """Record why `name` cannot run `op` in this installation (shown by `unigendet info`)."""
    _unavailable[(op, name)] = reason


def availability() -> dict[str, dict[str, str]]:
    """{op: {backend: "ok" | reason}} for every registered op, checked without inputs."""
    out: dict[str, dict[str, str]] = {}
    for op, cands in _REGISTRY.items():
        row: dict[str, str] = {}
        for name in BACKEND_NAMES:
            cand = next((c for c in cands if c.name == name), None)
            if cand is not None:
                why = cand.check()
                row[name] = "ok" if why is None else why
            elif (op, name) in _unavailable:
                row[name] = _unavailable[(op, name)]
        out[op] = row
    return out
