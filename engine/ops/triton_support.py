"""Capability checks shared by the Triton backends (kernels/ is imported lazily, on first use)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import numpy as np

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_IS_SLOW = "Triton interpreter: correct but slow; opt in with backend='triton'"
# Looked up once, at import: torch.compile traces the backend choice, and dynamo (torch 2.11) refuses to
# trace importlib.util.find_spec (a graph break, an error under fullgraph=True).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreter_incompatibility(triton_version: str | None, numpy_refuses_array_to_int: bool) -> str | None:
    """Why this Triton's CPU interpreter cannot run the kernels, or None.

    Triton <= 3.6 reads scalars in the interpreter (loop bounds, program ids) with int() of a 1-element
    array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars",
    from inside any kernel); Triton 3.7 squeezes the array first. torch 2.11 pins triton 3.6.0.
    """
    if triton_version is None or not numpy_refuses_array_to_int:
        return None
    found = re.match(r"(\d+)\.(\d+)", triton_version)
    if found is None or tuple(int(x) for x in found.groups()) > (3, 6):
        return None
    return (f"the CPU interpreter of triton {triton_version} fails with numpy {np.__version__} (int() of a "
            "1-element array); use triton >= 3.7 or numpy < 2.4 to interpret the kernels")


def _numpy_refuses_array_to_int() -> bool:
    try:
        int(np.ones(1))
    except TypeError:
        return True
    return False


def _triton_version() -> str | None:
    try:  # the distribution may be named otherwise (pytorch-triton): then no version is known
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


# Also fixed at import, for the same reason as TRITON_INSTALLED.
INTERPRETER_PROBLEM = interpreter_incompatibility(_triton_version() if TRITON_INSTALLED else None,
                                                  _numpy_refuses_array_to_int())


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET, read at kernel import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_reason(tensors: list[Tensor]) -> str | None:
    """None if Triton can run kernels on these tensors (or, given none, somewhere here), else why not."""
    if not TRITON_INSTALLED:
        return "the triton package is not installed"
    if not tensors:  # capability without inputs (`unigendet info`)
        if torch.cuda.is_available():
            return None
        if interpreting():
            return INTERPRETER_PROBLEM
        return "no CUDA device (set TRITON_INTERPRET=1 to run on the CPU interpreter, slowly)"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"inputs on several devices {sorted(str(d) for d in devices)}"
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 set before the kernels are imported"
    if device.type == "cpu" and INTERPRETER_PROBLEM:
        return INTERPRETER_PROBLEM
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type} unsupported"
    for t in tensors:
        if t.dtype not in TRITON_DTYPES:
            return f"dtype {t.dtype} unsupported (float32, float16, bfloat16)"
        if t.dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "bfloat16 needs a GPU of compute capability >= 8.0"
    return None


def auto_reason(tensors: list[Tensor]) -> str | None:
    """`auto` picks a Triton kernel only where it is fast: compiled on CUDA, not the interpreter."""
    if interpreting() or any(t.device.type == "cpu" for t in tensors):
        return INTERPRETER_IS_SLOW
    return None
