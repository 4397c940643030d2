"""Capability checks shared by the Triton backends (kernels/ is imported lazily, on first use)."""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_IS_SLOW = "Triton interpreter: correct but slow; opt in with backend='triton'"


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET, read at kernel import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_reason(tensors: list[Tensor]) -> str | None:
    """None if Triton can run kernels on these tensors (or, given none, somewhere here), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if not tensors:  # capability without inputs (`unigendet info`)
        if torch.cuda.is_available() or interpreting():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 to run on the CPU interpreter, slowly)"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"inputs on several devices {sorted(str(d) for d in devices)}"
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 set before the kernels are imported"
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
