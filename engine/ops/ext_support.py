"""The C++/CUDA extension `unigendet._C` (csrc/): loading it, what it was built with, what it can run.

Importing `unigendet._C` registers the ops `torch.ops.unigendet.*` (schemas and CPU/CUDA kernels);
their fake kernels and autograd formulas are registered from Python by the op modules (rmsnorm.py,
swiglu.py, rope.py) through `register_ext_op`. When the extension is missing or unusable, the
reason is kept and shown by `unigendet info` and in backend errors; model code never sees it.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable

import torch
from torch import Tensor

EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 too on CPU (gradcheck)
# at::vec instruction sets, weakest first: a build for a later one cannot run on a CPU of an earlier one.
_CPU_LEVELS = ["DEFAULT", "AVX2", "AVX512"]


def _load() -> tuple[object | None, dict, str | None]:
    """(module, build info, reason it cannot be used or None)."""
    try:
        module = importlib.import_module("unigendet._C")
    except ImportError as e:  # not built (UNIGENDET_NO_EXT, no compiler) or built against another torch
        return None, {}, (f"module unigendet._C not built or not loadable ({e}); "
                          "reinstall with `pip install --no-build-isolation -e .` and a C++ compiler")
    info = json.loads(getattr(module, "build_info", "{}") or "{}")
    built = info.get("cpu_capability", "DEFAULT")
    here = torch.backends.cpu.get_cpu_capability()
    here = here if here in _CPU_LEVELS else ("AVX2" if here.startswith("AVX2") else "DEFAULT")
    if _CPU_LEVELS.index(built) > _CPU_LEVELS.index(here):
        return module, info, (f"unigendet._C was built for {built} but this CPU supports {here}; "
                              "reinstall on this machine")
    return module, info, None


_module, BUILD_INFO, _LOAD_REASON = _load()


def ext_reason(*tensors: Tensor | None) -> str | None:
    """None if the extension can run an op on these tensors (given none: somewhere here), else why not."""
    if _LOAD_REASON is not None:
        return _LOAD_REASON
    present = [t for t in tensors if isinstance(t, Tensor)]
    if not present:
        return None
    devices = {t.device for t in present}
    if len(devices) > 1:
        return f"inputs on several devices {sorted(str(d) for d in devices)}"
    device = devices.pop()
    dtype = present[0].dtype
    if device.type == "cuda":
        if not BUILD_INFO.get("cuda"):
            return "unigendet._C was built without CUDA (no toolkit at build time; FORCE_CUDA=1 to require it)"
        if dtype not in EXT_DTYPES:
            return f"dtype {dtype} unsupported on CUDA (float32, float16, bfloat16)"
    elif device.type == "cpu":
        if dtype not in EXT_DTYPES + (torch.float64,):
            return f"dtype {dtype} unsupported (float32, float16, bfloat16, float64)"
    else:
        return f"device {device.type} unsupported (cpu, cuda)"
    return None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype (and the dtype of saved rstd): fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_ext_op(name: str, fake: Callable, setup_context: Callable | None = None,
                    backward: Callable | None = None) -> bool:
    """Register the fake kernel (and autograd, when given) of `torch.ops.unigendet.<name>`.

    Returns False (and registers nothing) when the extension cannot be used here.
    """
    if _module is None:
        return False
    qualname = f"unigendet::{name}"
    torch.library.register_fake(qualname)(fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return True


def describe() -> str:
    """One line for `unigendet info`."""
    if _module is None:
        return _LOAD_REASON or "not built"
    parts = [f"CPU kernels ({BUILD_INFO.get('cpu_capability', '?')})"]
    parts.append(f"CUDA kernels (arch {BUILD_INFO.get('cuda_arch_list')})" if BUILD_INFO.get("cuda")
                 else "no CUDA kernels")
    text = ", ".join(parts) + f"; built against torch {BUILD_INFO.get('torch', '?')}"
    return text if _LOAD_REASON is None else f"{text}; unusable: {_LOAD_REASON}"
