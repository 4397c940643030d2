"""Fused `bce_diga_loss` (docs/design.md §1, §3): BCE-with-logits over weighted rows + cosine alignment.

One pass over the inputs computes the loss parts AND the gradients for `logits` and `student`
(stored for backward, the way Liger-Kernel's fused losses do), so memory is inputs + gradients:
no (M, C) fp32 temporaries. Backward only rescales the stored gradients by the incoming gradient.

Kernels (all accumulate in fp32; loaded tiles are converted to fp32 right after `tl.load`, which
is also what keeps the CPU interpreter's bf16 correct):
  _fwd_kernel       programs [0, n_pa): one block of BLOCK_M rows of (M, C) each: dot, |s|^2, |t|^2
                    -> the block's sum of (1 - cos) into a partials buffer, and G_s = grad_mul *
                    d(1 - cos)/ds into the gradient buffer (student's dtype). C <= 8192: the row tile
                    is loaded once; larger C loops over chunks twice (the second read mostly hits L2).
                    Programs [n_pa, n_pa + n_pb): BCE_BLOCK rows of (N,) each: partial sums of
                    w * bce and of w, and G_z = w * (sigmoid(z) - y) in fp32, unnormalised.
  _finalize_kernel  ONE program reduces the partials in a fixed order -> (total, bce, align,
                    max(sum w, 1e-12)). No atomics: bitwise identical from run to run.
  _bwd_kernel       d_logits = G_z * (g_total + g_bce) / max(sum w, eps); G_s scaled in place by a
                    factor read from device memory (no host sync, CUDA-graph safe); when that factor
                    is exactly 1 (the usual `total.backward()`) G_s is not touched at all.

The gradient of the clamped cosine (matches eager autograd of the reference exactly):
  cos = dot / (max(|s|, eps) * max(|t|, eps))
  d(1 - cos)/ds = [|s| >= eps] * cos / |s|^2 * s - t / (max(|s|, eps) * max(|t|, eps))
(clamp_min passes the gradient where |s| >= eps; below eps the clamp is a constant.)

What is stored: G = c * d(1 - cos_m)/ds_m with c = w_fold / M for fp32/bf16 (w_fold = w_align, or 1
when w_align == 0) so that `total.backward()` needs no second pass over G; for fp16 c = w_fold only,
because (1/M)-scaled fp16 gradients underflow for large M (loss scaling then restores range), and
the backward pass applies the 1/M. Eagerly the op is a `torch.autograd.Function`; under
torch.compile it is a pair of `torch.library.custom_op`s with fakes and autograd (one opaque graph
node, no graph break). Backward consumes the stored gradients, so it can run once per forward.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from unigendet.ops.reference import LossParts

MAX_BLOCK_C = 8192   # widest row tile loaded in one piece (elements)
TILE = 8192          # elements of student (and of teacher) per program and iteration
NARROW_TILE = 2048   # ... when rows are narrower than 1024: a tile of many rows holds per-row values
                     # (sums, scales, row pointers) in every thread; at 8192 elements (64 x 128) an
                     # unaligned launch (row width or stride not a multiple of 16) spills on sm_90
                     # (255 registers + 88-240 B stack); at 2048 on 4 warps: 122-126, none
BCE_BLOCK = 1024
FIN_BLOCK = 4096
SCALE_BLOCK = 4096
NORM_EPS = 1e-8      # the reference's clamp of |s| and |t|
WSUM_EPS = 1e-12     # the reference's clamp of sum(w)


@triton.jit
def _align_block(s_ptr, t_ptr, g_ptr, part_ptr, blk, M, C, stride_s, stride_t, grad_mul, eps,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
                 WRITE_GRAD: tl.constexpr):
    """Rows [blk * BLOCK_M, (blk + 1) * BLOCK_M) of (M, C): partial sum of (1 - cos) -> part_ptr[blk]."""
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    rmask = rows < M
    rows = rows.to(tl.int64)  # M * C may exceed 2^31
    cols = tl.arange(0, BLOCK_C)
    s_row = s_ptr + rows[:, None] * stride_s  # (BLOCK_M, 1) row pointers
    t_row = t_ptr + rows[:, None] * stride_t
    g_row = g_ptr + rows[:, None] * C         # the gradient buffer is contiguous (M, C)
    if ONE_PASS:
        mask = rmask[:, None] & (cols[None, :] < C)
        s = tl.load(s_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_C)
        t = tl.load(t_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(s * t, axis=1)
        ss = tl.sum(s * s, axis=1)
        tt = tl.sum(t * t, axis=1)
    else:
        dot = tl.zeros([BLOCK_M], dtype=tl.float32)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        tt = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = rmask[:, None] & ((c0 + cols)[None, :] < C)
            s = tl.load(s_row + (c0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + (c0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(s * t, axis=1)
            ss += tl.sum(s * s, axis=1)
            tt += tl.sum(t * t, axis=1)
    ns = tl.sqrt(ss)
    nt = tl.sqrt(tt)
    inv_den = 1.0 / (tl.maximum(ns, eps) * tl.maximum(nt, eps))  # (BLOCK_M,)
    cos = dot * inv_den
    tl.store(part_ptr + blk, tl.sum(tl.where(rmask, 1.0 - cos, 0.0), axis=0))
    if WRITE_GRAD:
        # d(1 - cos)/ds = a * s - b * t (see the module docstring), times grad_mul
        a = tl.where(ns >= eps, cos / tl.maximum(ss, eps * eps), 0.0) * grad_mul
        b = inv_den * grad_mul
        if ONE_PASS:
            g = a[:, None] * s - b[:, None] * t
            tl.store(g_row + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
        else:
            for c0 in range(0, C, BLOCK_C):
                mask = rmask[:, None] & ((c0 + cols)[None, :] < C)
                s = tl.load(s_row + (c0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_row + (c0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                g = a[:, None] * s - b[:, None] * t
                tl.store(g_row + (c0 + cols)[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bce_block(z_ptr, y_ptr, w_ptr, g_ptr, part_l_ptr, part_w_ptr, blk, N,
               BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Rows [blk * BLOCK, (blk + 1) * BLOCK) of (N,): sum(w * bce) -> part_l[blk], sum(w) -> part_w[blk]."""
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # stable BCE-with-logits: max(z, 0) - z*y + log1p(exp(-|z|)); log1p without libdevice via
    # log1p(e) = log(u) * e / (u - 1), u = 1 + e (accurate where u rounds; e itself where u == 1)
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
    loss = tl.maximum(z, 0.0) - z * y + log1p_e
    tl.store(part_l_ptr + blk, tl.sum(tl.where(mask, w * loss, 0.0), axis=0))
    tl.store(part_w_ptr + blk, tl.sum(w, axis=0))
    if WRITE_GRAD:
        # sigmoid from e = exp(-|z|) in (0, 1]: never overflows, also for |z| = 100
        sig = tl.where(z >= 0, 1.0 / u, e / u)
        tl.store(g_ptr + offs, w * (sig - y), mask=mask)  # unnormalised: backward divides by sum(w)


@triton.jit
def _fwd_kernel(s_ptr, t_ptr, gs_ptr, M, C, stride_s, stride_t, grad_mul, eps,
                z_ptr, y_ptr, w_ptr, gz_ptr, N, part_ptr, n_pa, n_pb,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
                BCE_BLOCK: tl.constexpr, GRAD_S: tl.constexpr, GRAD_Z: tl.constexpr):
    # programs [0, n_pa) take the alignment row blocks, [n_pa, n_pa + n_pb) the BCE row blocks;
    # part_ptr: [align partials (n_pa) | sum(w * bce) partials (n_pb) | sum(w) partials (n_pb)]
    pid = tl.program_id(0)
    if pid < n_pa:
        _align_block(s_ptr, t_ptr, gs_ptr, part_ptr, pid, M, C, stride_s, stride_t, grad_mul, eps,
                     BLOCK_M, BLOCK_C, ONE_PASS, GRAD_S)
    else:
        _bce_block(z_ptr, y_ptr, w_ptr, gz_ptr, part_ptr + n_pa, part_ptr + n_pa + n_pb, pid - n_pa, N,
                   BCE_BLOCK, GRAD_Z)


@triton.jit
def _finalize_kernel(part_ptr, n_pa, n_pb, out_ptr, inv_m, w_align, wsum_eps,
                     HAS_ALIGN: tl.constexpr, HAS_BCE: tl.constexpr, BLOCK: tl.constexpr):
    # ONE program, fixed order: the same partials always give the same bits (no float atomics)
    offs = tl.arange(0, BLOCK)
    align = 0.0
    bce = 0.0
    wsum = 1.0
    if HAS_ALIGN:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n_pa, BLOCK):
            acc += tl.load(part_ptr + i + offs, mask=i + offs < n_pa, other=0.0)
        align = tl.sum(acc, axis=0) * inv_m
    if HAS_BCE:
        acc_l = tl.zeros([BLOCK], dtype=tl.float32)
        acc_w = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n_pb, BLOCK):
            acc_l += tl.load(part_ptr + n_pa + i + offs, mask=i + offs < n_pb, other=0.0)
            acc_w += tl.load(part_ptr + n_pa + n_pb + i + offs, mask=i + offs < n_pb, other=0.0)
        wsum = tl.maximum(tl.sum(acc_w, axis=0), wsum_eps)
        bce = tl.sum(acc_l, axis=0) / wsum
    tl.store(out_ptr + 0, bce + w_align * align)
    tl.store(out_ptr + 1, bce)
    tl.store(out_ptr + 2, align)
    tl.store(out_ptr + 3, wsum)


@triton.jit
def _bwd_kernel(gs_ptr, n_s, gz_ptr, dz_ptr, N, gout_ptr, out_ptr, coef_total, coef_align, coef_all,
                HAS_S: tl.constexpr, HAS_Z: tl.constexpr, BLOCK: tl.constexpr):
    # gout = d(loss)/d(total, bce, align, .); all scales are read on device: no host sync
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g_total = tl.load(gout_ptr + 0)
    if HAS_Z:  # d_logits = G_z * (g_total + g_bce) / max(sum w, eps), a new tensor in the logits dtype
        scale_z = (g_total + tl.load(gout_ptr + 1)) / tl.load(out_ptr + 3)
        for bz in range(pid, tl.cdiv(N, BLOCK), nprog):
            offs_z = bz * BLOCK + tl.arange(0, BLOCK)
            mask_z = offs_z < N
            gz = tl.load(gz_ptr + offs_z, mask=mask_z, other=0.0)
            tl.store(dz_ptr + offs_z, (gz * scale_z).to(dz_ptr.dtype.element_ty), mask=mask_z)
    if HAS_S:  # G_s *= scale in place; nothing to do (one scalar read) for the usual total.backward()
        scale = (g_total * coef_total + tl.load(gout_ptr + 2) * coef_align) * coef_all
        if scale != 1.0:
            for bs in range(pid, tl.cdiv(n_s, BLOCK), nprog):
                offs = tl.cast(bs, tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n_s may exceed 2^31
                mask = offs < n_s
                x = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(gs_ptr + offs, (x * scale).to(gs_ptr.dtype.element_ty), mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _align_config(M: int, C: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_C, ONE_PASS, num_warps) for an (M, C) alignment problem."""
    block_c = min(_next_pow2(max(C, 1)), MAX_BLOCK_C)
    block_m = max(1, min((TILE if block_c >= 1024 else NARROW_TILE) // block_c, _next_pow2(max(M, 1)), 64))
    tile = block_c * block_m
    num_warps = 16 if block_c >= 8192 else (8 if tile >= 4096 else 4)
    return block_m, block_c, C <= block_c, num_warps


def _grad_fold(w_align: float, dtype: torch.dtype, M: int) -> tuple[float, float, float, float]:
    """(grad_mul, coef_total, coef_align, coef_all): G = grad_mul * d(1-cos)/ds is stored;
    the gradient w.r.t. student is (g_total * coef_total + g_align * coef_align) * coef_all * G."""
    w_fold = w_align if w_align != 0.0 else 1.0
    coef_total, coef_align = w_align / w_fold, 1.0 / w_fold  # coef_total == 1.0 when folded
    if dtype == torch.float16:
        return w_fold, coef_total, coef_align, 1.0 / M
    return w_fold / M, coef_total, coef_align, 1.0


def _forward(logits, targets, weights, student, teacher, w_align: float, eps: float,
             grad_logits: bool, grad_student: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out (4,) fp32 = [total, bce, align, max(sum w, 1e-12)], G_logits (N,) fp32 unnormalised,
    G_student (M, C) in student's dtype, pre-scaled as in `_grad_fold`); absent ones are (0,)."""
    ref = logits if logits is not None else student
    dev = ref.device
    out = torch.empty(4, device=dev, dtype=torch.float32)
    g_logits = torch.empty(0, device=dev, dtype=torch.float32)   # outputs must not alias each other
    g_student = torch.empty(0, device=dev, dtype=torch.float32)
    M = C = N = n_pa = n_pb = 0
    block_m, block_c, one_pass, num_warps = 1, 16, True, 4
    grad_mul, inv_m = 1.0, 0.0
    if student is not None:
        M, C = student.shape
        block_m, block_c, one_pass, num_warps = _align_config(M, C)
        n_pa = triton.cdiv(M, block_m)
        grad_mul = _grad_fold(w_align, student.dtype, max(M, 1))[0]
        if grad_student:
            g_student = torch.empty((M, C), device=dev, dtype=student.dtype)
        inv_m = 1.0 / M if M > 0 else float("nan")  # the mean of nothing, as torch's mean
    if logits is not None:
        N = logits.shape[0]
        n_pb = triton.cdiv(N, BCE_BLOCK)
        if grad_logits:
            g_logits = torch.empty(N, device=dev, dtype=torch.float32)
    partials = torch.empty(max(n_pa + 2 * n_pb, 1), device=dev, dtype=torch.float32)
    if n_pa + n_pb > 0:
        s_args = (student, teacher, g_student if grad_student else partials) if student is not None else (partials,) * 3
        z_args = ((logits, targets, weights, g_logits if grad_logits else partials) if logits is not None
                  else (partials,) * 4)
        _fwd_kernel[(n_pa + n_pb,)](*s_args, M, C, student.stride(0) if student is not None else 0,
                                    teacher.stride(0) if student is not None else 0, grad_mul, eps,
                                    *z_args, N, partials, n_pa, n_pb,
                                    BLOCK_M=block_m, BLOCK_C=block_c, ONE_PASS=one_pass, BCE_BLOCK=BCE_BLOCK,
                                    GRAD_S=grad_student, GRAD_Z=grad_logits, num_warps=num_warps)
    _finalize_kernel[(1,)](partials, n_pa, n_pb, out, inv_m, w_align, WSUM_EPS,
                           HAS_ALIGN=student is not None, HAS_BCE=logits is not None, BLOCK=FIN_BLOCK,
                           num_warps=8)
    return out, g_logits, g_student


def _backward(out: Tensor, g_logits: Tensor, g_student: Tensor, grad_out: Tensor, logits_dtype,
              coef_total: float, coef_align: float, coef_all: float) -> Tensor:
    """Scales g_student in place (when needed) and returns d_logits (or an empty tensor)."""
    has_z, has_s = g_logits.numel() > 0, g_student.numel() > 0
    grad_out = grad_out.to(torch.float32).contiguous()
    d_logits = torch.empty(g_logits.shape, device=g_logits.device, dtype=logits_dtype)
    if not (has_z or has_s):
        return d_logits
    nblocks = max(triton.cdiv(g_student.numel(), SCALE_BLOCK), triton.cdiv(g_logits.numel(), SCALE_BLOCK))
    if g_student.is_cuda or g_logits.is_cuda:
        grid = min(nblocks, _sm_count(out.device) * 8)
    else:
        grid = min(nblocks, 4)
    _bwd_kernel[(grid,)](g_student, g_student.numel(), g_logits, d_logits, g_logits.numel(), grad_out, out,
                         coef_total, coef_align, coef_all, HAS_S=has_s, HAS_Z=has_z, BLOCK=SCALE_BLOCK,
                         num_warps=8)
    return d_logits


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _fold_for(w_align: float, student: Tensor | None) -> tuple[float, float, float]:
    if student is None:
        return 1.0, 1.0, 1.0
    return _grad_fold(w_align, student.dtype, max(student.shape[0], 1))[1:]


_DOUBLE_BACKWARD = ("bce_diga_loss (triton): backward through the same loss twice is not supported; the "
                    "gradients stored by the forward pass were consumed (scaled in place) by the first backward")


# ----------------------------------------------------------------------------- eager autograd


class _BceDigaLoss(torch.autograd.Function):
    """Eager path: a plain autograd.Function (about half the host overhead of a custom op call)."""

    @staticmethod
    def forward(ctx, logits, targets, weights, student, teacher, w_align, eps, grad_logits, grad_student):
        out, g_logits, g_student = _forward(logits, targets, weights, student, teacher, w_align, eps,
                                            grad_logits, grad_student)
        ctx.save_for_backward(out, g_logits, g_student)
        ctx.logits_dtype = logits.dtype if logits is not None else torch.float32
        ctx.fold = _fold_for(w_align, student)
        ctx.used = False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError(_DOUBLE_BACKWARD)
        ctx.used = True
        out, g_logits, g_student = ctx.saved_tensors
        d_logits = _backward(out, g_logits, g_student, grad_out, ctx.logits_dtype, *ctx.fold)
        return (d_logits if g_logits.numel() else None, None, None,
                g_student if g_student.numel() else None, None, None, None, None, None)


# ----------------------------------------------------------------------------- torch.library ops
# Under torch.compile the same kernels run as two custom ops with fakes and autograd, so the loss is
# one opaque graph node (no graph break); the backward op declares its in-place write on G_student.


@torch.library.custom_op("unigendet::bce_diga_loss_fwd", mutates_args=(),
                         schema="(Tensor? logits, Tensor? targets, Tensor? weights, Tensor? student, "
                                "Tensor? teacher, float w_align, float eps, bool grad_logits, "
                                "bool grad_student) -> (Tensor, Tensor, Tensor)")
def _fwd_op(logits, targets, weights, student, teacher, w_align, eps, grad_logits, grad_student):
    return _forward(logits, targets, weights, student, teacher, w_align, eps, grad_logits, grad_student)


@_fwd_op.register_fake
def _fwd_fake(logits, targets, weights, student, teacher, w_align, eps, grad_logits, grad_student):
    ref = logits if logits is not None else student
    out = ref.new_empty(4, dtype=torch.float32)
    g_logits = ref.new_empty(logits.shape[0] if (logits is not None and grad_logits) else 0, dtype=torch.float32)
    if student is not None and grad_student:
        g_student = student.new_empty(student.shape)
    else:
        g_student = ref.new_empty(0, dtype=torch.float32)
    return out, g_logits, g_student


@torch.library.custom_op("unigendet::bce_diga_loss_bwd_", mutates_args=("g_student",),
                         schema="(Tensor out, Tensor g_logits, Tensor(a!) g_student, Tensor grad_out, "
                                "ScalarType logits_dtype, float coef_total, float coef_align, "
                                "float coef_all) -> Tensor")
def _bwd_op(out, g_logits, g_student, grad_out, logits_dtype, coef_total, coef_align, coef_all):
    return _backward(out, g_logits, g_student, grad_out, logits_dtype, coef_total, coef_align, coef_all)


@_bwd_op.register_fake
def _bwd_fake(out, g_logits, g_student, grad_out, logits_dtype, coef_total, coef_align, coef_all):
    return g_logits.new_empty(g_logits.shape, dtype=logits_dtype)


def _setup_context(ctx, inputs, output):
    logits, targets, weights, student, teacher, w_align, eps, grad_logits, grad_student = inputs
    ctx.save_for_backward(*output)
    ctx.logits_dtype = logits.dtype if logits is not None else torch.float32
    ctx.fold = _fold_for(w_align, student)
    ctx.used = False


def _op_backward(ctx, grad_out, _g_logits, _g_student):
    if ctx.used:
        raise RuntimeError(_DOUBLE_BACKWARD)
    ctx.used = True
    out, g_logits, g_student = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 9
    d_logits = torch.ops.unigendet.bce_diga_loss_bwd_(out, g_logits, g_student, grad_out, ctx.logits_dtype,
                                                      *ctx.fold)
    return (d_logits if g_logits.numel() else None, None, None,
            g_student if g_student.numel() else None, None, None, None, None, None)


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry


def bce_diga_loss_triton(logits: Tensor | None, targets: Tensor | None, weights: Tensor | None,
                         student: Tensor | None, teacher: Tensor | None, *, w_align: float = 0.5,
                         eps: float = NORM_EPS) -> LossParts:
    """The `triton` backend of `ops.bce_diga_loss` (same arguments and semantics as the reference).

    Differentiable w.r.t. logits and student, once (backward consumes the stored gradients).
    """
    grad_on = torch.is_grad_enabled()
    if logits is not None:
        logits = logits.contiguous()
        targets = torch.zeros_like(logits) if targets is None else targets.contiguous()
        weights = torch.ones_like(logits) if weights is None else weights.contiguous()
    if student is not None:
        teacher = teacher.detach()
        if student.stride(-1) != 1:
            student = student.contiguous()
        if teacher.stride(-1) != 1:
            teacher = teacher.contiguous()
    args = (logits, targets, weights, student, teacher, float(w_align), float(eps),
            bool(grad_on and logits is not None and logits.requires_grad),
            bool(grad_on and student is not None and student.requires_grad))
    if torch.compiler.is_compiling():
        out = torch.ops.unigendet.bce_diga_loss_fwd(*args)[0]
    else:
        out = _BceDigaLoss.apply(*args)
    return LossParts(out[0], out[1], out[2])
