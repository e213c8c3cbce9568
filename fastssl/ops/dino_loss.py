"""Fused multi-crop soft cross-entropy: the DINO, DINOv2 and iBOT losses.

For student logits ``s`` of shape (S*B, K) (crops stacked, crop v is rows v*B .. v*B+B-1) and
teacher rows ``t`` of shape (T*B, K)::

    loss = sum_b w[b] sum_{i,v} P[i,v] * CE(q_i[b], s_v[b] / tau_s)
    CE(q, z) = -sum_k q_k log_softmax(z)_k = lse(z) * sum(q) - q . z
    q_i = softmax((t_i - center) / tau_t)      (or t_i itself: probability targets)

DINO: P = 1 off the diagonal / (2 * S - 2), w = 1 / B. iBOT: S = T = 1, rows are masked
patches, w = per-patch weight / images. The identity ``CE = lse * sum(q) - q . z`` is why no
per-pair tensor is needed: per image, one pass yields the teacher softmax statistics, the
student log-sum-exps and the T x S dot products ``q_i . z_v``.

Kernels (bytes for e-byte logits, R = (S + T) * B rows):

- ``_dino_forward_kernel``: grid (K chunks, image groups). Per image, loads the T teacher
  and S student rows of its chunk once ([T_PAD | S_PAD, BLOCK_K] tiles) and writes chunk
  partials: teacher max and sum, student max and sum, and the T x S dots, each rescaled to
  the chunk's own max. It also sums the raw teacher rows for the center. Reads ``R*K*e``;
  writes ``B*(2T + 2S + T*S)`` floats per chunk, merged by a few PyTorch ops into O(R) stats.
- ``_dino_backward_kernel``: grid (images, K chunks): the images on axis 0, whose limit is
  2^31 - 1 (axes 1 and 2 stop at 65,535, and iBOT's rows, masked patches, pass that at
  DINOv2's 518-px stage). Recomputes q and the student softmax
  from the saved O(R) statistics (per row: raw maximum, log2-sum relative to it) and
  writes ``dL/ds = w[b] / tau_s * sum_i P[i,v] * (sum(q_i) p_v - q_i)`` once: reads
  ``R*K*e``, writes ``S*B*K*e``.

FLOPs are about 10 per logit plus 2*T*S per image and column: bandwidth-bound.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastssl._checks import check_float_tensor, check_positive_float, check_positive_int
from fastssl.backend import Reason, select_backend
from fastssl.ops.triton_math import programs_per_wave
from fastssl.reference.dino import dino_cross_entropy_reference

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
TILE_ELEMENTS = 8192


@triton.jit
def _crop_tile(chunk, K, T: tl.constexpr, S: tl.constexpr, T_PAD: tl.constexpr, S_PAD: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Indices and masks of one chunk of columns across the T teacher and S student crops."""
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    t_rows = tl.arange(0, T_PAD)
    s_rows = tl.arange(0, S_PAD)
    t_mask = (t_rows < T)[:, None] & col_mask[None, :]
    s_mask = (s_rows < S)[:, None] & col_mask[None, :]
    return cols, col_mask, t_rows, s_rows, t_mask, s_mask


@triton.jit
def _image_rows_offsets(b, B, stride, rows, cols):
    """Offsets of image b's row in each crop (crop c holds rows c*B .. c*B+B-1)."""
    return (rows[:, None] * B + b).to(tl.int64) * stride + cols[None, :]


@triton.jit
def _dino_forward_kernel(
    student_ptr, teacher_ptr, center_ptr,
    t_max_ptr, t_sum_ptr, s_max_ptr, s_sum_ptr, dots_ptr, column_sum_ptr,
    B, K, n_chunks, images_per_group,
    stride_s, stride_t,
    student_scale, student_scale2, teacher_scale2,
    T: tl.constexpr, S: tl.constexpr, T_PAD: tl.constexpr, S_PAD: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Chunk partials for images [group * images_per_group, ...) and columns of one chunk.

    Partials are laid out (B, T_PAD[, S_PAD], n_chunks): per row the chunk's maximum in raw
    units (student s, teacher y = t - center) and ``sum(exp2((value - max) * scale2))``, with
    scale2 = log2(e) / temperature, and per (teacher, student) row pair the dot of the
    chunk's unnormalized q with ``(s - student chunk max) / tau_s``. For probability targets
    the teacher "max" is 0 and its "sum" is sum(q) over the chunk.
    """
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    cols, col_mask, t_rows, s_rows, t_mask, s_mask = _crop_tile(chunk, K, T, S, T_PAD, S_PAD, BLOCK_K)
    if HAS_CENTER:
        center = tl.load(center_ptr + cols, mask=col_mask, other=0.0)
    column_sum = tl.zeros([BLOCK_K], dtype=tl.float32)

    first = group * images_per_group
    last = tl.minimum(first + images_per_group, B)
    for b in range(first, last):
        t_offsets = _image_rows_offsets(b, B, stride_t, t_rows, cols)
        t = tl.load(teacher_ptr + t_offsets, mask=t_mask, other=0.0).to(tl.float32)
        s_offsets = _image_rows_offsets(b, B, stride_s, s_rows, cols)
        s = tl.load(student_ptr + s_offsets, mask=s_mask, other=0.0).to(tl.float32)

        # Maxima in raw units, exponents of (value - max) * scale: small where it matters.
        s_max = tl.max(tl.where(s_mask, s, float("-inf")), axis=1)
        s_shift = tl.where(s_max == float("-inf"), 0.0, s_max)
        s_sum = tl.sum(tl.where(s_mask, tl.exp2((s - s_shift[:, None]) * student_scale2), 0.0), axis=1)

        if TEACHER_LOGITS:
            column_sum += tl.sum(t, axis=0)
            y = t
            if HAS_CENTER:
                y = t - center[None, :]
            t_max = tl.max(tl.where(t_mask, y, float("-inf")), axis=1)
            t_shift = tl.where(t_max == float("-inf"), 0.0, t_max)
            q = tl.where(t_mask, tl.exp2((y - t_shift[:, None]) * teacher_scale2), 0.0)
        else:
            t_max = tl.zeros([T_PAD], dtype=tl.float32)
            q = t
        t_sum = tl.sum(q, axis=1)
        # q . (z - chunk max of z): small terms, so the loss avoids lse - q.z cancellation.
        z_offset = (s - s_shift[:, None]) * student_scale
        dots = tl.sum(q[:, None, :] * z_offset[None, :, :], axis=2)

        t_out = (b * T_PAD + t_rows) * n_chunks + chunk
        tl.store(t_max_ptr + t_out, t_max)
        tl.store(t_sum_ptr + t_out, t_sum)
        s_out = (b * S_PAD + s_rows) * n_chunks + chunk
        tl.store(s_max_ptr + s_out, s_max)
        tl.store(s_sum_ptr + s_out, s_sum)
        d_out = ((b * T_PAD + t_rows[:, None]) * S_PAD + s_rows[None, :]) * n_chunks + chunk
        tl.store(dots_ptr + d_out, dots)
    if TEACHER_LOGITS:
        tl.store(column_sum_ptr + group * K + cols, column_sum, mask=col_mask)


@triton.jit
def _dino_backward_kernel(
    student_ptr, teacher_ptr, center_ptr, grad_ptr,
    s_stats_ptr, t_stats_ptr, pair_ptr, sample_weight_ptr, grad_out_ptr,
    B, K,
    stride_s, stride_t, stride_g,
    student_scale, student_scale2, teacher_scale2,
    T: tl.constexpr, S: tl.constexpr, T_PAD: tl.constexpr, S_PAD: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dL/ds for the S student rows of image program_id(0), columns of chunk program_id(1)."""
    b = tl.program_id(0)
    cols, col_mask, t_rows, s_rows, t_mask, s_mask = _crop_tile(tl.program_id(1), K, T, S, T_PAD, S_PAD, BLOCK_K)
    t_valid = t_rows < T
    s_valid = s_rows < S

    t = tl.load(teacher_ptr + _image_rows_offsets(b, B, stride_t, t_rows, cols), mask=t_mask, other=0.0)
    t = t.to(tl.float32)
    # Row statistics: (raw maximum, log2 of the sum relative to it[, sum of q]).
    if TEACHER_LOGITS:
        y = t
        if HAS_CENTER:
            y = t - tl.load(center_ptr + cols, mask=col_mask, other=0.0)[None, :]
        t_top = tl.load(t_stats_ptr + (b * T + t_rows) * 3, mask=t_valid, other=0.0)
        t_log2sum = tl.load(t_stats_ptr + (b * T + t_rows) * 3 + 1, mask=t_valid, other=0.0)
        q = tl.where(t_mask, tl.exp2((y - t_top[:, None]) * teacher_scale2 - t_log2sum[:, None]), 0.0)
    else:
        q = t
    s = tl.load(student_ptr + _image_rows_offsets(b, B, stride_s, s_rows, cols), mask=s_mask, other=0.0)
    s = s.to(tl.float32)
    s_top = tl.load(s_stats_ptr + (b * S + s_rows) * 2, mask=s_valid, other=0.0)
    s_log2sum = tl.load(s_stats_ptr + (b * S + s_rows) * 2 + 1, mask=s_valid, other=0.0)
    p = tl.exp2((s - s_top[:, None]) * student_scale2 - s_log2sum[:, None])

    pairs = tl.load(pair_ptr + t_rows[:, None] * S + s_rows[None, :],
                    mask=t_valid[:, None] & s_valid[None, :], other=0.0)
    q_sum = tl.load(t_stats_ptr + (b * T + t_rows) * 3 + 2, mask=t_valid, other=0.0)
    p_weight = tl.sum(pairs * q_sum[:, None], axis=0)
    mixed_q = tl.sum(pairs[:, :, None] * q[:, None, :], axis=0)
    scale = tl.load(sample_weight_ptr + b) * tl.load(grad_out_ptr) * student_scale
    grad = (p_weight[:, None] * p - mixed_q) * scale
    grad_offsets = _image_rows_offsets(b, B, stride_g, s_rows, cols)
    tl.store(grad_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=s_mask)


def _launch_shape(K: int, n_student: int, n_teacher: int):
    t_pad, s_pad = triton.next_power_of_2(n_teacher), triton.next_power_of_2(n_student)
    block_k = max(16, min(triton.next_power_of_2(K), TILE_ELEMENTS // (t_pad * s_pad), 512))
    return t_pad, s_pad, block_k, 8 if t_pad * s_pad * block_k >= 4096 else 4


def _scales(student_temp: float, teacher_temp: Optional[float]):
    teacher_scale2 = LOG2_E / teacher_temp if teacher_temp is not None else 0.0
    return 1.0 / student_temp, LOG2_E / student_temp, teacher_scale2


class Partials(NamedTuple):
    """Per-chunk statistics of a (rows, K) logits pair; see ``_dino_forward_kernel``.
    Shapes (B, T | S [, S], chunks); ``column_sum`` (K,) or empty for probability targets."""

    t_max: torch.Tensor
    t_sum: torch.Tensor
    s_max: torch.Tensor
    s_sum: torch.Tensor
    dots: torch.Tensor
    column_sum: torch.Tensor


def _forward_partials(student, teacher, center, n_student, n_teacher, student_temp, teacher_temp,
                      launch: bool = True) -> Partials:
    """The forward kernel's partials; ``launch=False`` (the fakes): the same allocations, no kernel."""
    K = student.shape[1]
    B = student.shape[0] // n_student
    t_pad, s_pad, block_k, num_warps = _launch_shape(K, n_student, n_teacher)
    n_chunks = triton.cdiv(K, block_k)
    target = programs_per_wave(student.device, elsewhere=4)
    n_groups = max(1, min(B, triton.cdiv(target, n_chunks)))
    images_per_group = triton.cdiv(B, n_groups)
    n_groups = triton.cdiv(B, images_per_group)
    teacher_logits = teacher_temp is not None

    f32 = dict(device=student.device, dtype=torch.float32)
    t_max = torch.empty((B, t_pad, n_chunks), **f32)
    t_sum = torch.empty((B, t_pad, n_chunks), **f32)
    s_max = torch.empty((B, s_pad, n_chunks), **f32)
    s_sum = torch.empty((B, s_pad, n_chunks), **f32)
    dots = torch.empty((B, t_pad, s_pad, n_chunks), **f32)
    column_sums = torch.empty((n_groups, K), **f32) if teacher_logits else None
    if launch:
        _dino_forward_kernel[(n_chunks, n_groups)](
            student, teacher, center, t_max, t_sum, s_max, s_sum, dots, column_sums,
            B, K, n_chunks, images_per_group, student.stride(0), teacher.stride(0),
            *_scales(student_temp, teacher_temp),
            T=n_teacher, S=n_student, T_PAD=t_pad, S_PAD=s_pad,
            TEACHER_LOGITS=teacher_logits, HAS_CENTER=center is not None,
            BLOCK_K=block_k, num_warps=num_warps,
        )
    column_sum = column_sums.sum(0) if teacher_logits else t_max.new_zeros(0)
    return Partials(t_max[:, :n_teacher], t_sum[:, :n_teacher], s_max[:, :n_student],
                    s_sum[:, :n_student], dots[:, :n_teacher, :n_student], column_sum)


def _merge_partials(parts: Partials, student_temp, teacher_temp, pair_weights, sample_weights):
    """Returns (loss, student stats (B, S, 2), teacher stats (B, T, 3)): per row the raw
    maximum and the log2-sum relative to it (teacher: and the sum of q)."""
    t_max, t_sum, s_max, s_sum, dots, _ = parts
    student_scale, student_scale2, teacher_scale2 = _scales(student_temp, teacher_temp)
    s_top, s_log2sum, _ = _merge_chunks(s_max, s_sum, student_scale2)
    # q . (z - z_max) per (image, teacher, student) from the chunks' q . (z - chunk max).
    shift_to_row_max = (s_max - s_top[..., None]) * student_scale  # (B, S, chunks), <= 0
    if teacher_temp is not None:
        t_top, t_log2sum, rescale = _merge_chunks(t_max, t_sum, teacher_scale2)
        t_sum = t_sum * rescale
        q_sum = torch.ones_like(t_top)
        normalizer = torch.exp2(t_log2sum)[..., None]
    else:
        rescale = torch.ones_like(t_sum)
        q_sum = t_sum.sum(-1)
        t_top = t_log2sum = torch.zeros_like(q_sum)
        normalizer = 1.0
    q_dot_offset = (dots * rescale[:, :, None, :]).sum(-1) + torch.einsum(
        "btc,bsc->bts", t_sum, shift_to_row_max)
    q_dot_offset = q_dot_offset / normalizer
    # CE = lse(z) * sum(q) - q . z = log-sum-exp of (z - z_max) * sum(q) - q . (z - z_max)
    ce = (s_log2sum * LN_2)[:, None, :] * q_sum[:, :, None] - q_dot_offset  # (B, T, S)
    loss = torch.einsum("bts,ts,b->", ce, pair_weights, sample_weights)
    student_stats = torch.stack([s_top, s_log2sum], dim=-1)
    teacher_stats = torch.stack([t_top, t_log2sum, q_sum], dim=-1)
    return loss, student_stats, teacher_stats


def _merge_chunks(chunk_max: torch.Tensor, chunk_sum: torch.Tensor, scale2: float):
    """Merge per-chunk (raw max, sum of exp2((x - max) * scale2)) into per-row
    (max, log2 of the sum relative to it), and return the chunks' rescale factors."""
    top = chunk_max.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    rescale = torch.exp2((chunk_max - top) * scale2)
    return top.squeeze(-1), torch.log2((chunk_sum * rescale).sum(-1)), rescale


def _dino_backward_triton(grad_out, student, teacher, center, student_stats, teacher_stats,
                          pair_weights, sample_weights, n_student, n_teacher,
                          student_temp, teacher_temp, launch: bool = True):
    """dL/dstudent; ``launch=False`` (the fake): the same allocations, no kernel."""
    K = student.shape[1]
    B = student.shape[0] // n_student
    t_pad, s_pad, block_k, num_warps = _launch_shape(K, n_student, n_teacher)
    grad = torch.empty_like(student)
    grad_out = grad_out.float()
    if not launch:
        return grad
    _dino_backward_kernel[(B, triton.cdiv(K, block_k))](
        student, teacher, center, grad, student_stats, teacher_stats, pair_weights, sample_weights,
        grad_out, B, K, student.stride(0), teacher.stride(0), grad.stride(0),
        *_scales(student_temp, teacher_temp),
        T=n_teacher, S=n_student, T_PAD=t_pad, S_PAD=s_pad,
        TEACHER_LOGITS=teacher_temp is not None, HAS_CENTER=center is not None,
        BLOCK_K=block_k, num_warps=num_warps,
    )
    return grad


# ----------------------------------------------------------------------------- custom ops
# Optional floats cannot be None in a custom op schema, so teacher_temp <= 0 stands for
# "teacher rows are probabilities" below the public API.


def _optional_temp(teacher_temp: float) -> Optional[float]:
    return teacher_temp if teacher_temp > 0 else None


@torch.library.custom_op("fastssl::dino_cross_entropy_partials", mutates_args=())
def partials_op(
    student: torch.Tensor, teacher: torch.Tensor, center: Optional[torch.Tensor],
    n_student: int, n_teacher: int, student_temp: float, teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel alone, for callers that merge partials of several K slices."""
    return _own_partials(_forward_partials(student, teacher, center, n_student, n_teacher, student_temp,
                                           _optional_temp(teacher_temp)))


def _own_partials(parts: Partials) -> tuple:
    # A custom op's outputs may not be views: the crops' slices of the padded buffers are copied.
    return tuple(part.clone() if part._base is not None else part for part in parts)


@partials_op.register_fake
def _(student, teacher, center, n_student, n_teacher, student_temp, teacher_temp):
    # The launcher without its kernel: the padded float32 partials (and the teacher column
    # sums per image group), then the copies of their crop slices that the op returns.
    return _own_partials(_forward_partials(student, teacher, center, n_student, n_teacher, student_temp,
                                           _optional_temp(teacher_temp), launch=False))


@torch.library.custom_op("fastssl::dino_cross_entropy_fwd", mutates_args=())
def _forward_op(
    student: torch.Tensor, teacher: torch.Tensor, center: Optional[torch.Tensor],
    pair_weights: torch.Tensor, sample_weights: torch.Tensor,
    n_student: int, n_teacher: int, student_temp: float, teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    teacher_temp = _optional_temp(teacher_temp)
    parts = _forward_partials(student, teacher, center, n_student, n_teacher, student_temp, teacher_temp)
    loss, student_stats, teacher_stats = _merge_partials(
        parts, student_temp, teacher_temp, pair_weights, sample_weights)
    return loss, student_stats, teacher_stats, parts.column_sum


@_forward_op.register_fake
def _(student, teacher, center, pair_weights, sample_weights, n_student, n_teacher,
      student_temp, teacher_temp):
    # The partials as the launcher allocates them (no kernel), then the same merge: its
    # PyTorch temporaries are the op's too.
    teacher_temp = _optional_temp(teacher_temp)
    parts = _forward_partials(student, teacher, center, n_student, n_teacher, student_temp, teacher_temp,
                              launch=False)
    loss, student_stats, teacher_stats = _merge_partials(
        parts, student_temp, teacher_temp, pair_weights, sample_weights)
    return loss, student_stats, teacher_stats, parts.column_sum


@torch.library.custom_op("fastssl::dino_cross_entropy_bwd", mutates_args=())
def backward_op(
    grad_out: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
    center: Optional[torch.Tensor], student_stats: torch.Tensor, teacher_stats: torch.Tensor,
    pair_weights: torch.Tensor, sample_weights: torch.Tensor,
    n_student: int, n_teacher: int, student_temp: float, teacher_temp: float,
) -> torch.Tensor:
    return _dino_backward_triton(
        grad_out, student, teacher, center, student_stats, teacher_stats, pair_weights,
        sample_weights, n_student, n_teacher, student_temp, _optional_temp(teacher_temp),
    )


@backward_op.register_fake
def _(grad_out, student, teacher, center, student_stats, teacher_stats, pair_weights, sample_weights,
      n_student, n_teacher, student_temp, teacher_temp):
    # dL/dstudent (like student) and the float32 copy of a 16-bit upstream gradient.
    return _dino_backward_triton(grad_out, student, teacher, center, student_stats, teacher_stats, pair_weights,
                                 sample_weights, n_student, n_teacher, student_temp, _optional_temp(teacher_temp),
                                 launch=False)


def _setup_context(ctx, inputs, output):
    student, teacher, center, pair_weights, sample_weights, n_student, n_teacher, ts, tt = inputs
    _, student_stats, teacher_stats, _ = output
    ctx.save_for_backward(student, teacher, center, student_stats, teacher_stats, pair_weights, sample_weights)
    ctx.constants = (n_student, n_teacher, ts, tt)


def _backward(ctx, grad_loss, *unused_grads):
    grad = backward_op(grad_loss, *ctx.saved_tensors, *ctx.constants)
    return grad, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def dino_pair_weights(n_teacher: int, n_student: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DINO's pairing: teacher crop i with every student crop v != i, averaged over pairs."""
    pairs = torch.ones(n_teacher, n_student, device=device, dtype=dtype)
    pairs[torch.arange(min(n_teacher, n_student)), torch.arange(min(n_teacher, n_student))] = 0
    return pairs / pairs.sum()


def _check_inputs(student, teacher, center, n_student, n_teacher, pair_weights, sample_weights):
    check_float_tensor("student", student, min_dim=2)
    check_float_tensor("teacher", teacher, min_dim=2)
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"student and teacher must be 2-D (crops * B, K), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] % n_student:
        raise ValueError(f"student has {student.shape[0]} rows, not a multiple of "
                         f"n_student_crops={n_student}")
    B = student.shape[0] // n_student
    if teacher.shape != (n_teacher * B, student.shape[1]):
        raise ValueError(f"teacher must be (n_teacher_crops * B, K) = ({n_teacher * B}, "
                         f"{student.shape[1]}), got {tuple(teacher.shape)}")
    if center is not None and center.numel() != student.shape[1]:
        raise ValueError(f"center must hold K={student.shape[1]} values, got shape {tuple(center.shape)}")
    if pair_weights.shape != (n_teacher, n_student):
        raise ValueError(f"pair_weights must be ({n_teacher}, {n_student}), got {tuple(pair_weights.shape)}")
    if sample_weights.shape != (B,):
        raise ValueError(f"sample_weights must be ({B},), got {tuple(sample_weights.shape)}")
    tensors = [student, teacher, pair_weights, sample_weights] + ([center] if center is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("student, teacher, center and weights must be on one device")


def kernel_dtype_reason(*tensors: torch.Tensor) -> Reason:
    if any(t.dtype == torch.float64 for t in tensors):
        return "the kernels compute in float32; float64 input runs on the reference backend"
    return None


def _why_not_triton(student: torch.Tensor, teacher: torch.Tensor) -> Reason:
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        return "the kernels need unit stride along K (call .contiguous())"
    return kernel_dtype_reason(student, teacher)


class DINOInputs(NamedTuple):
    n_student: int
    n_teacher: int
    student_temp: float
    teacher_temp: Optional[float]
    center: Optional[torch.Tensor]
    pair_weights: torch.Tensor
    sample_weights: torch.Tensor


def prepare_dino_inputs(student, teacher, n_student_crops, n_teacher_crops, student_temp, teacher_temp,
                        center, pair_weights, sample_weights, require_teacher_temp=False) -> DINOInputs:
    """Check the arguments of the DINO cross-entropy ops (raising before any kernel runs)
    and fill in the defaults: DINO's pair weights, uniform 1 / B sample weights. Center and
    weights are float32 (the kernels' precision), float64 for float64 student rows (which run
    on the reference backend, the float64 oracle)."""
    n_student = check_positive_int("n_student_crops", n_student_crops)
    n_teacher = check_positive_int("n_teacher_crops", n_teacher_crops)
    student_temp = check_positive_float("student_temp", student_temp)
    if teacher_temp is not None or require_teacher_temp:
        teacher_temp = check_positive_float("teacher_temp", teacher_temp)
    elif center is not None:
        raise ValueError("center applies to teacher logits: give teacher_temp, or no center")
    check_float_tensor("student", student, min_dim=2)
    device = student.device
    precision = torch.float64 if student.dtype == torch.float64 else torch.float32
    if pair_weights is None:
        pair_weights = dino_pair_weights(n_teacher, n_student, device, precision)
    if sample_weights is None:
        B = student.shape[0] // n_student
        sample_weights = torch.full((B,), 1.0 / max(B, 1), device=device, dtype=precision)
    _check_inputs(student, teacher, center, n_student, n_teacher, pair_weights, sample_weights)
    return DINOInputs(
        n_student, n_teacher, student_temp, teacher_temp,
        None if center is None else center.detach().to(precision).reshape(-1).contiguous(),
        pair_weights.to(precision).contiguous(), sample_weights.detach().to(precision).contiguous(),
    )


def dino_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    n_student_crops: int,
    n_teacher_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: Optional[float] = None,
    center: Optional[torch.Tensor] = None,
    pair_weights: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Soft cross-entropy of teacher targets against student crops, every pair fused.

    Args:
        student: (S * B, K) student logits, crops stacked (crop v = rows v*B .. v*B+B-1).
        teacher: (T * B, K) teacher logits (with ``teacher_temp``: the targets are
            ``softmax((teacher - center) / teacher_temp)``) or target probabilities
            (``teacher_temp=None``, e.g. Sinkhorn-Knopp assignments). No gradient flows to it.
        n_student_crops, n_teacher_crops: S and T.
        student_temp: tau_s; the student distribution is ``softmax(student / tau_s)``.
        center: (K,) or (1, K) teacher center, logits targets only.
        pair_weights: (T, S) weight of each (teacher crop, student crop) pair; default DINO's
            (every v != i, averaged: :func:`dino_pair_weights`).
        sample_weights: (B,) weight of each image; default 1 / B.
    Returns:
        ``(loss, teacher_column_sum)``: the scalar float32 loss
        ``sum_b w[b] sum_{i,v} P[i,v] CE(q_i[b], student_v[b] / tau_s)``, differentiable with
        respect to ``student``, and the (K,) float32 sum of the teacher rows (for the DINO
        center; None for probability targets).
    """
    inputs = prepare_dino_inputs(student, teacher, n_student_crops, n_teacher_crops, student_temp,
                                 teacher_temp, center, pair_weights, sample_weights)
    teacher = teacher.detach()
    backend = select_backend("dino_cross_entropy", student.device, {
        "triton": lambda: _why_not_triton(student, teacher),
        "reference": lambda: None,
    })
    if backend == "reference":
        return dino_cross_entropy_reference(student, teacher, *inputs)
    loss, _, _, column_sum = _forward_op(
        student, teacher, inputs.center, inputs.pair_weights, inputs.sample_weights,
        inputs.n_student, inputs.n_teacher, inputs.student_temp,
        inputs.teacher_temp if inputs.teacher_temp is not None else 0.0,
    )
    return loss, (column_sum.detach() if inputs.teacher_temp is not None else None)


def dino_cross_entropy_bytes(n_rows: int, n_student_rows: int, K: int, dtype: torch.dtype) -> int:
    """Minimal traffic of one forward + backward: the forward reads every logit once, the
    backward reads them again and writes the student gradient once. Used by the benchmarks."""
    return (2 * n_rows + n_student_rows) * K * torch.empty((), dtype=dtype).element_size()
