"""What Triton kernels load and store, counted under the interpreter (TRITON_INTERPRET=1).

`traffic(**named)` patches the interpreter's masked load / store and its grid executor for the
duration of a `with` block and counts, per (kernel, buffer), the tile accesses and the bytes of
the lanes their masks enable. A buffer is the named tensor whose memory holds the access, else the
kernel parameter whose tensor does ("gs_ptr"). This is the CPU check of which blocks a kernel
visits and how often it reads its inputs: not of its speed.
"""
import contextlib
from collections import defaultdict

import torch
from triton.runtime import interpreter


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


@contextlib.contextmanager
def traffic(**named: torch.Tensor):
    """Yields {(kernel, buffer): {"load_tiles", "loaded", "store_tiles", "stored"}} (bytes for
    loaded / stored), filled while the block runs."""
    stats = defaultdict(lambda: {"load_tiles": 0, "loaded": 0, "store_tiles": 0, "stored": 0})
    named_spans = [(name, *_span(t)) for name, t in named.items()]
    launch = {"kernel": None, "spans": []}  # the kernel being interpreted and its tensor parameters

    def owner(addresses) -> str:
        a = int(addresses.min())
        for name, lo, hi in named_spans + launch["spans"]:
            if lo <= a < hi:
                return name
        return "<unknown>"

    def count(ptrs, mask, kind: str):
        enabled = int(mask.data.sum())  # the interpreter's unmasked load / store pass an all-true mask
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        s = stats[(launch["kernel"], owner(ptrs.data))]
        s[f"{kind}_tiles"] += 1
        s["loaded" if kind == "load" else "stored"] += enabled * width

    real_call = interpreter.GridExecutor.__call__
    real_load = interpreter.InterpreterBuilder.create_masked_load
    real_store = interpreter.InterpreterBuilder.create_masked_store

    def call(self, *args, **kwargs):
        params = dict(zip(self.arg_names, args)) | kwargs
        launch["kernel"] = self.fn.__name__
        launch["spans"] = [(name, *_span(t)) for name, t in params.items() if isinstance(t, torch.Tensor)]
        try:
            return real_call(self, *args, **kwargs)
        finally:
            launch["kernel"], launch["spans"] = None, []

    def load(self, ptrs, mask, other, *rest):
        count(ptrs, mask, "load")
        return real_load(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        count(ptrs, mask, "store")
        return real_store(self, ptrs, value, mask, *rest)

    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_masked_load = load
    interpreter.InterpreterBuilder.create_masked_store = store
    try:
        yield stats
    finally:
        interpreter.GridExecutor.__call__ = real_call
        interpreter.InterpreterBuilder.create_masked_load = real_load
        interpreter.InterpreterBuilder.create_masked_store = real_store
