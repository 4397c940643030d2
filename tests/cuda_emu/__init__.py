"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator in this folder (see cuda_emu.h).

`library()` compiles csrc/cuda/*.cu with the emulator as host C++ (cached under build/cuda_emu/, keyed
by the sources and the build variant) and loads it with ctypes; the torch-level functions below call
the kernels' host entry points (csrc/cuda/launch.h) with the contract of csrc/cuda/register.cpp, so
the tests can hold them to the same accuracy rule as the GPU. Outputs and workspaces start as NaN, so an
element a kernel forgets to write shows up.
"""
import contextlib
import ctypes
import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sanitizer import compiler

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = [HERE / "selftest.cu", *sorted(CUDA_DIR.glob("*.cu"))]  # instrumented (trace.cpp)
SOURCES = [HERE / "cuda_emu.cpp", HERE / "capi.cpp", HERE / "trace.cpp", *KERNEL_SOURCES]
HEADERS = [HERE / "cuda_emu.h", *sorted((HERE / "include").glob("*.h")), *sorted(CUDA_DIR.glob("*.h")),
           *sorted(CUDA_DIR.glob("*.cuh"))]
FLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized",
         f"-I{HERE / 'include'}", f"-I{CUDA_DIR}"]
# --no-undefined: a host function of launch.h that no .cu defines with that signature fails the link
# (register.cpp, compiled against the same header, would otherwise fail to load on a GPU machine)
LINK_FLAGS = ["-shared", "-Wl,--no-undefined"]
SANITIZE_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
# the kernels of the plain build report their loads and stores to trace.cpp (traffic counters, and
# the check that no kernel reads __shared__ memory its block has not written)
TRACE_FLAGS = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]
# gcov counters of the kernels (atomic updates: the tracer above does not see them as memory accesses)
COVERAGE_FLAGS = ["--coverage", "-fprofile-update=atomic"]
# build variant: (flags of every source, extra flags of the kernel sources)
VARIANTS = {"plain": ([], TRACE_FLAGS), "asan": (SANITIZE_FLAGS, []), "coverage": (COVERAGE_FLAGS, TRACE_FLAGS)}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # unigendet::cuda::DType


def variant() -> str:
    """The build this process uses: UNIGENDET_CUDA_EMU = plain (default) | asan | coverage. asan needs
    the ASan runtime preloaded (sanitizer.asan_env); coverage writes gcov counters next to its objects."""
    name = os.environ.get("UNIGENDET_CUDA_EMU", "plain")
    if name not in VARIANTS:
        raise ValueError(f"UNIGENDET_CUDA_EMU={name!r}: expected one of {sorted(VARIANTS)}")
    return name


def _digest(flags: list[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    for path in SOURCES + HEADERS:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def library_path(name: str = "plain") -> Path:
    """The emulated library of build variant `name`, compiled on first use (one object per source, in
    parallel, kept beside it: the coverage build's gcov notes and counters live there)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no g++ to build the CUDA emulator")
    flags, kernel_flags = FLAGS + VARIANTS[name][0], VARIANTS[name][1]
    out = ROOT / "build" / "cuda_emu" / f"{_digest(flags + kernel_flags + LINK_FLAGS)}-{name}" / "libcuda_emu.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> Path:
        obj = out.parent / f"{src.name}.o"
        extra = kernel_flags if src in KERNEL_SOURCES else []
        proc = subprocess.run([cxx, "-x", "c++", *flags, *extra, "-c", str(src), "-o", str(obj)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src} for the CUDA emulator failed:\n{proc.stderr[-4000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    tmp_lib = out.with_suffix(".tmp")
    link = subprocess.run([cxx, *LINK_FLAGS, *flags, *map(str, objects), "-o", str(tmp_lib)],
                          capture_output=True, text=True)
    if link.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n{link.stderr[-4000:]}")
    os.replace(tmp_lib, out)  # atomic: an interrupted build never leaves half a library
    return out


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    sigs = {
        "cuda_emu_error": ([], ctypes.c_char_p),
        "cuda_emu_set_seed": ([ctypes.c_uint64], None),
        "cuda_emu_fused_add_rmsnorm_fwd": ([i32, p, p, p, p, p, p, i64, i64, f32], i32),
        "cuda_emu_rmsnorm_bwd_num_partials": ([i64], i64),
        "cuda_emu_fused_add_rmsnorm_bwd": ([i32, p, p, p, p, p, p, p, i64, p, i64, i64], i32),
        "cuda_emu_swiglu_fwd": ([i32, p, p, i64, i64], i32),
        "cuda_emu_swiglu_bwd": ([i32, p, p, p, i64, i64], i32),
        "cuda_emu_rmsnorm_rope_fwd": ([i32, p, p, p, p, p, p, p, f32], i32),
        "cuda_emu_rmsnorm_rope_bwd_num_partials": ([p], i64),
        "cuda_emu_rmsnorm_rope_bwd": ([i32, p, p, p, p, p, p, p, p, p, i64, p], i32),
        "cuda_emu_selftest": ([ctypes.c_char_p, p, p, i32, i32], i32),
        "cuda_emu_trace_start": ([i32, ctypes.POINTER(p), ctypes.POINTER(i64)], None),
        "cuda_emu_trace_stop": ([], None),
        "cuda_emu_trace_stat": ([i32, i32], i64),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


_LIBS: dict[str, ctypes.CDLL] = {}


def library() -> ctypes.CDLL:
    """This process's build variant (variant()), loaded once."""
    name = variant()
    if name not in _LIBS:
        _LIBS[name] = _bind(ctypes.CDLL(str(library_path(name))))
    return _LIBS[name]


_SEED = [0]
_TRACES: list[dict] = []  # open trace() blocks


def call(name: str, *args, buffers: dict[str, torch.Tensor | None]):
    """Calls cuda_emu_<name> with a fresh thread-order seed; raises with the emulator's message on failure.
    `buffers` names the tensors the call reads or writes, for trace()."""
    lib = library()
    _SEED[0] += 1
    lib.cuda_emu_set_seed(_SEED[0])
    named = {k: t for k, t in buffers.items() if t is not None}
    if _TRACES:
        n = len(named)
        ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in named.values()])
        sizes = (ctypes.c_int64 * n)(*[t.nbytes for t in named.values()])
        lib.cuda_emu_trace_start(n, ptrs, sizes)
    try:
        if getattr(lib, f"cuda_emu_{name}")(*args) != 0:
            raise RuntimeError(f"emulated CUDA {name}: {lib.cuda_emu_error().decode()}")
    finally:
        if _TRACES:
            lib.cuda_emu_trace_stop()
            stats = {k: {"bytes": t.nbytes,
                         **{stat: lib.cuda_emu_trace_stat(i, j) for j, stat in enumerate(TRACE_STATS)}}
                     for i, (k, t) in enumerate(named.items())}
            for t in _TRACES:
                t.setdefault(name, []).append(stats)


TRACE_STATS = ("loaded", "stored", "accesses")


@contextlib.contextmanager
def trace():
    """Memory traffic of the kernels called inside the block (plain and coverage builds: the asan one is
    not instrumented): {entry point: [per call: {buffer: {"bytes": its size, "loaded": bytes,
    "stored": bytes, "accesses": n}}]}, e.g. t["swiglu_fwd"][0]["gate_up"]["loaded"]."""
    seen: dict = {}
    _TRACES.append(seen)
    try:
        yield seen
    finally:
        _TRACES.remove(seen)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _nan(*shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype)


def _code(t: torch.Tensor) -> int:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"the CUDA kernels take float32/float16/bfloat16, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous (rows, cols), keeping x's own memory (and alignment) when it is contiguous."""
    return x.contiguous().view(-1, x.shape[-1])


# ---------------------------------------------------------------- fused_add_rmsnorm
def rmsnorm_forward(x, residual, weight, eps):
    """(y, res, rstd) like register.cpp's fused_add_rmsnorm."""
    x2, r2 = _rows(x), (None if residual is None else _rows(residual))
    w = weight.float().contiguous()
    y, res, rstd = _nan(*x2.shape, like=x), _nan(*x2.shape, like=x), _nan(x2.shape[0], like=x, dtype=torch.float32)
    call("fused_add_rmsnorm_fwd", _code(x), _ptr(x2), _ptr(r2), _ptr(w), _ptr(y), _ptr(res), _ptr(rstd),
         x2.shape[0], x2.shape[1], eps, buffers=dict(x=x2, residual=r2, weight=w, y=y, res=res, rstd=rstd))
    return y.view(x.shape), res.view(x.shape), rstd.view(x.shape[:-1])


def rmsnorm_backward(grad_y, grad_res, res, weight, rstd):
    gy, gr, r2 = _rows(grad_y), (None if grad_res is None else _rows(grad_res)), _rows(res)
    rows, cols = r2.shape
    w, rs = weight.float().contiguous(), rstd.float().contiguous()
    lib = library()
    parts = lib.cuda_emu_rmsnorm_bwd_num_partials(rows)
    grad_x, partial = _nan(rows, cols, like=res), _nan(parts, cols, like=res, dtype=torch.float32)
    grad_w = _nan(cols, like=res, dtype=torch.float32)
    call("fused_add_rmsnorm_bwd", _code(res), _ptr(gy), _ptr(gr), _ptr(r2), _ptr(w), _ptr(rs), _ptr(grad_x),
         _ptr(partial), parts, _ptr(grad_w), rows, cols,
         buffers=dict(grad_y=gy, grad_res=gr, res=r2, weight=w, rstd=rs, grad_x=grad_x, partial=partial,
                      grad_weight=grad_w))
    return grad_x.view(res.shape), grad_w


class _FusedAddRmsnorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, res, rstd = rmsnorm_forward(x, residual, weight, eps)
        ctx.save_for_backward(res, weight, rstd)
        ctx.has_residual = residual is not None
        return y, res

    @staticmethod
    def backward(ctx, grad_y, grad_res):
        res, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = rmsnorm_backward(grad_y, grad_res, res, weight, rstd)
        return grad_x, (grad_x if ctx.has_residual else None), grad_w.to(weight.dtype), None


def fused_add_rmsnorm(x, residual, weight, eps=1e-6):
    return _FusedAddRmsnorm.apply(x, residual, weight, eps)


# ---------------------------------------------------------------- swiglu
def swiglu_forward(gate_up):
    gu = _rows(gate_up)
    rows, features = gu.shape[0], gu.shape[1] // 2
    out = _nan(rows, features, like=gate_up)
    call("swiglu_fwd", _code(gu), _ptr(gu), _ptr(out), rows, features, buffers=dict(gate_up=gu, out=out))
    return out.view(*gate_up.shape[:-1], features)


def swiglu_backward(grad_out, gate_up):
    gu, go = _rows(gate_up), _rows(grad_out)
    grad = _nan(*gu.shape, like=gate_up)
    call("swiglu_bwd", _code(gu), _ptr(go), _ptr(gu), _ptr(grad), gu.shape[0], gu.shape[1] // 2,
         buffers=dict(grad_out=go, gate_up=gu, grad_gate_up=grad))
    return grad.view(gate_up.shape)


class _Swiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx, grad_out):
        return swiglu_backward(grad_out, ctx.saved_tensors[0])


def swiglu(gate_up):
    return _Swiglu.apply(gate_up)


# ---------------------------------------------------------------- rmsnorm + RoPE (one of q, k)
def _rope_shape(x: torch.Tensor) -> ctypes.Array:
    """{B, T, H, D, stride_b, stride_t, stride_h} of x (B, T, H, D), strided with unit last stride."""
    if x.stride(-1) != 1:
        raise ValueError("the RoPE kernels need a unit stride in the head dimension")
    return (ctypes.c_int64 * 7)(*x.shape, *x.stride()[:3])


def rope_forward(x, weight, cos, sin, eps):
    """(out, rstd) of one of q / k: out contiguous (B, T, H, D), rstd (B, T, H) fp32."""
    shape = _rope_shape(x)
    w, c, s = (t.float().contiguous() for t in (weight, cos, sin))
    out, rstd = _nan(*x.shape, like=x), _nan(*x.shape[:3], like=x, dtype=torch.float32)
    call("rmsnorm_rope_fwd", _code(x), _ptr(x), shape, _ptr(w), _ptr(c), _ptr(s), _ptr(out), _ptr(rstd), eps,
         buffers=dict(x=x, weight=w, cos=c, sin=s, out=out, rstd=rstd))
    return out, rstd


def rope_backward(grad_out, x, weight, cos, sin, rstd):
    shape = _rope_shape(x)
    w, c, s = (t.float().contiguous() for t in (weight, cos, sin))
    go = grad_out.contiguous()
    lib = library()
    parts = lib.cuda_emu_rmsnorm_rope_bwd_num_partials(shape)
    D = x.shape[-1]
    grad_x, partial, grad_w = _nan(*x.shape, like=x), _nan(parts, D, like=x, dtype=torch.float32), \
        _nan(D, like=x, dtype=torch.float32)
    call("rmsnorm_rope_bwd", _code(x), _ptr(go), _ptr(x), shape, _ptr(w), _ptr(c), _ptr(s), _ptr(rstd),
         _ptr(grad_x), _ptr(partial), parts, _ptr(grad_w),
         buffers=dict(grad_out=go, x=x, weight=w, cos=c, sin=s, rstd=rstd, grad_x=grad_x, partial=partial,
                      grad_weight=grad_w))
    return grad_x, grad_w


class _QkRmsnormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, eps):
        q_out, q_rstd = rope_forward(q, q_weight, cos, sin, eps)
        k_out, k_rstd = rope_forward(k, k_weight, cos, sin, eps)
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        q, k, qw, kw, cos, sin, q_rstd, k_rstd = ctx.saved_tensors
        dq, dqw = rope_backward(grad_q, q, qw, cos, sin, q_rstd)
        dk, dkw = rope_backward(grad_k, k, kw, cos, sin, k_rstd)
        return dq, dk, dqw.to(qw.dtype), dkw.to(kw.dtype), None, None, None


def qk_rmsnorm_rope(q, k, q_weight, k_weight, cos, sin, eps=1e-6):
    return _QkRmsnormRope.apply(q, k, q_weight, k_weight, cos, sin, eps)


# ---------------------------------------------------------------- the emulator's own checks
def selftest(name: str, inputs: torch.Tensor, threads: int, param: int = 0) -> torch.Tensor:
    """out (threads,) of the self-test kernel `name` of selftest.cu on one block of `threads` threads."""
    x = inputs.float().contiguous()
    out = torch.full((threads,), float("nan"))
    call("selftest", name.encode(), _ptr(x), _ptr(out), threads, param, buffers=dict(inputs=x, out=out))
    return out

