"""Bytes of new tensor memory that torch ops allocate inside a `with` block (CPU or GPU alike).

`allocated()` is a TorchDispatchMode: every aten op's outputs whose storage is not one of its inputs'
count with their storage size. Frees are not seen, so the total bounds the peak from above: enough
to show that a fused op allocates its outputs and gradients only, where eager code allocates
(M, C) temporaries or (T, T) scores.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class allocated(TorchDispatchMode):
    """`with allocated() as a: ...` then a.bytes (total) and a.largest (op, bytes) of the biggest."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.largest = ("", 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                n = t.untyped_storage().nbytes()
                self.bytes += n
                self.largest = max(self.largest, (str(func), n), key=lambda x: x[1])
        return out
