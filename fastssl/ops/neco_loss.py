"""NeCo's patch-ordering loss, fused: Triton kernels, custom ops, functional API.

Per similarity row (length n) the original sorts the student and the teacher row with a
differentiable sorting network, materializes both n x n permutation matrices in memory and
takes ``-sum_j P_t[i, j] log P_s[i, j]`` (REFERENCE.md section 5; semantics and the underflow
guard in :mod:`fastssl.reference.neco`). Here both matrices are formed on chip by the sorting
kernels of :mod:`fastssl.ops.soft_sort` and only the per-row loss leaves the kernel.

Guard: ``log P_s`` is evaluated as ``log(max(P_s, 2^-149))``, exactly the original's value for
every positive float32 ``P_s`` (subnormals are scaled by 2^24 before the ``log`` so that no
hardware approximation flushes them), and ``log(2^-149) = -103.28`` where ``P_s`` underflowed
to 0, where the original gives ``-inf`` (or NaN next to ``P_t == 0``). The gradient of such an
entry is 0 (the clamp's derivative); every other entry's is the original's ``-P_t / P_s``.

Kernels (R rows, L layers, N = next power of two >= n; e-byte inputs):

- ``_neco_forward_kernel``: grid (R, N / TILE). Sorts the teacher and the student row with
  their P tiles (two forwards, ``~10 * N^2 * L`` FLOPs per row), reduces the tile's
  ``sum P_t log P_s`` and writes one float per (row, tile). Reads ``2*n*e`` bytes per row and
  writes 4; the original writes and reads back two n x n matrices per row plus, in diffsort,
  O(L * n^2) activations.
- backward: ``_soft_sort_backward_kernel`` with NECO set: it rebuilds the student's P with
  checkpoints, the teacher's P once, forms the guarded adjoint ``-(g / n) P_t / P_s`` on chip
  and runs the soft-sort backward (``~20 * N^2 * L`` FLOPs per row). Reads ``2*n*e``, writes
  ``n*e`` bytes per row, plus an (R, L, N) float32 buffer and per-program scratch (see
  :mod:`fastssl.ops.soft_sort`). Nothing is saved between forward and backward but the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from fastssl.backend import Reason, select_backend
from fastssl.ops._soft_sort_native import (
    native_backward_fake,
    neco_loss_backward_native,
    neco_loss_forward_native,
    why_not_native,
)
from fastssl.ops.soft_sort import (
    DEFAULT_BACKENDS,
    _identity_tile,
    _load_row,
    _sort_tile,
    check_sort_arguments,
    distribution_id,
    launch_shape,
    raise_if_not_finite,
    soft_sort_backward_triton,
    why_not_triton,
)
from fastssl.profiling import SORTING
from fastssl.reference.diffsort import network_codes_tensor
from fastssl.reference.neco import neco_loss_rows_reference

SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)  # 2^-126
SUBNORMAL_SCALE = tl.constexpr(16777216.0)  # 2^24
LOG_SUBNORMAL_SCALE = tl.constexpr(16.635532333438686)  # 24 ln 2
LOG_SMALLEST_POSITIVE = tl.constexpr(-103.27892990343185)  # ln 2^-149


@triton.jit
def _guarded_log(P):
    """log(max(P, 2^-149)) for P >= 0 in float32 (see the module docstring)."""
    subnormal = P < SMALLEST_NORMAL
    scaled = tl.where(subnormal, P * SUBNORMAL_SCALE, P)
    value = tl.log(tl.where(P > 0, scaled, 1.0)) - tl.where(subnormal, LOG_SUBNORMAL_SCALE, 0.0)
    return tl.where(P > 0, value, LOG_SMALLEST_POSITIVE)


@triton.jit
def _neco_forward_kernel(
    student_ptr, teacher_ptr, codes_ptr, partial_ptr,
    n, n_layers, n_tiles, stride_sr, stride_sc, stride_tr, stride_tc,
    steepness_student, steepness_teacher, art_lambda,
    N: tl.constexpr, TILE: tl.constexpr, DISTRIBUTION: tl.constexpr,
):
    """``sum_{i in tile, j} P_t[i, j] log P_s[i, j]`` of row program_id(0) and tile program_id(1)."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    wires = tl.arange(0, N)
    x_s = _load_row(student_ptr, row, n, stride_sr, stride_sc, wires)
    inputs, P_s = _identity_tile(tile, wires, TILE)
    x_s, P_s = _sort_tile(codes_ptr, n_layers, x_s, P_s, wires, steepness_student, art_lambda, TILE, N, DISTRIBUTION)
    x_t = _load_row(teacher_ptr, row, n, stride_tr, stride_tc, wires)
    _, P_t = _identity_tile(tile, wires, TILE)
    x_t, P_t = _sort_tile(codes_ptr, n_layers, x_t, P_t, wires, steepness_teacher, art_lambda, TILE, N, DISTRIBUTION)
    valid = (inputs[:, None] < n) & (wires[None, :] < n)
    terms = tl.where(valid, P_t * _guarded_log(P_s), 0.0)
    tl.store(partial_ptr + row * n_tiles + tile, tl.sum(tl.sum(terms, axis=1), axis=0))


def _neco_rows_triton(student, teacher, steepness_student, steepness_teacher, network, distribution, art_lambda,
                      launch: bool = True):
    """Per-row losses; ``launch=False`` (the fake): the same allocations, no kernel."""
    rows, n = student.shape
    N, tile, num_warps = launch_shape(n, student.device)
    n_tiles = N // tile
    partial = torch.empty((rows, n_tiles), dtype=torch.float32, device=student.device)
    if not launch:
        return partial.sum(1) / -n
    codes = network_codes_tensor(network, n, student.device)
    _neco_forward_kernel[(rows, n_tiles)](
        student, teacher, codes, partial, n, codes.shape[0], n_tiles,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        float(steepness_student), float(steepness_teacher), float(art_lambda),
        N=N, TILE=tile, DISTRIBUTION=distribution_id(distribution), num_warps=num_warps,
    )
    return partial.sum(1) / -n


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastssl::neco_loss_rows", mutates_args=())
def _neco_rows_op(student: torch.Tensor, teacher: torch.Tensor, steepness_student: float, steepness_teacher: float,
                  network: str, distribution: str, art_lambda: float, backend: str) -> torch.Tensor:
    run = _neco_rows_triton if backend == "triton" else neco_loss_forward_native
    return run(student, teacher, steepness_student, steepness_teacher, network, distribution, art_lambda)


@_neco_rows_op.register_fake
def _(student, teacher, steepness_student, steepness_teacher, network, distribution, art_lambda, backend):
    # Triton: the float32 partial sums per (row, P tile) and their reduction; native: the losses.
    if backend == "triton":
        return _neco_rows_triton(student, teacher, steepness_student, steepness_teacher, network, distribution,
                                 art_lambda, launch=False)
    return student.new_empty((student.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastssl::neco_loss_bwd", mutates_args=())
def neco_backward_op(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                     steepness_student: float, steepness_teacher: float, network: str, distribution: str,
                     art_lambda: float, backend: str) -> torch.Tensor:
    if backend != "triton":
        return neco_loss_backward_native(grad_rows, student, teacher, steepness_student, steepness_teacher, network,
                                         distribution, art_lambda).to(student.dtype)
    return soft_sort_backward_triton(student, None, None, steepness_student, network, distribution, art_lambda,
                                     teacher=teacher, grad_rows=grad_rows.float().contiguous(),
                                     teacher_steepness=steepness_teacher)


@neco_backward_op.register_fake
def _(grad_rows, student, teacher, steepness_student, steepness_teacher, network, distribution, art_lambda, backend):
    # The soft-sort backward's allocations (see its fake), with the NeCo adjoint formed on chip.
    if backend != "triton":
        return native_backward_fake(student, network, art_lambda, backend)
    return soft_sort_backward_triton(student, None, None, steepness_student, network, distribution, art_lambda,
                                     teacher=teacher, grad_rows=grad_rows.float().contiguous(),
                                     teacher_steepness=steepness_teacher, launch=False)


def _setup_context(ctx, inputs, output):
    student, teacher, *constants = inputs
    ctx.save_for_backward(student, teacher)
    ctx.constants = constants


def _backward(ctx, grad_rows):
    student, teacher = ctx.saved_tensors
    return neco_backward_op(grad_rows, student, teacher, *ctx.constants), None, None, None, None, None, None, None


_neco_rows_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def neco_loss(
    student_sim: torch.Tensor,
    teacher_sim: torch.Tensor,
    steepness_student: float = 100.0,
    steepness_teacher: float = 100.0,
    network: str = "bitonic",
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
    reduction: str = "mean",
) -> torch.Tensor:
    """NeCo's patch-ordering loss on similarity rows, both sorts fused with the cross-entropy.

    Args:
        student_sim, teacher_sim: (..., n) similarity rows (NeCo: (bs * 49, 49), query patch
            against reference patches), n >= 2; float32, bfloat16 or float16 on the kernels
            (computed in float32), float64 on the reference backend. No gradient flows to
            ``teacher_sim``.
        steepness_student, steepness_teacher, network, distribution, art_lambda: the sorting
            networks' parameters (see :func:`fastssl.ops.soft_sort`); NeCo uses bitonic, cauchy, 100.
        reduction: ``"mean"`` (NeCo's ``-mean_{rows, i} sum_j P_t log P_s``, a scalar) or
            ``"none"`` (the (...) per-row losses ``-(1/n) sum_{i,j} P_t log P_s``).
    Returns the float32 loss (float64 for float64 rows), differentiable w.r.t. ``student_sim``.

    ``log P_s`` is guarded where an entry of P_s underflows to 0 (see
    :mod:`fastssl.reference.neco`): always finite, and equal to the original wherever that is.
    Raises ``ValueError`` on mismatched shapes, n < 2 or unknown names; NaN/Inf rows stop it
    (:func:`fastssl._checks.check_finite`: a ValueError on the CPU, a device-side assert on a GPU).
    """
    n = check_sort_arguments("student_sim", student_sim, steepness_student, network, distribution, art_lambda)
    check_sort_arguments("teacher_sim", teacher_sim, steepness_teacher, network, distribution, art_lambda)
    if teacher_sim.shape != student_sim.shape:
        raise ValueError(f"teacher_sim must have student_sim's shape {tuple(student_sim.shape)}, "
                         f"got {tuple(teacher_sim.shape)}")
    if teacher_sim.device != student_sim.device:
        raise ValueError("student_sim and teacher_sim must be on one device")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    raise_if_not_finite("student_sim", student_sim)
    raise_if_not_finite("teacher_sim", teacher_sim)
    teacher_sim = teacher_sim.detach()

    def triton_reason() -> Reason:
        return why_not_triton(student_sim, n) or why_not_triton(teacher_sim, n)

    def native_reason() -> Reason:
        return why_not_native(student_sim, n) or why_not_native(teacher_sim, n)

    backend = select_backend("neco_loss", student_sim.device, {
        "cuda": native_reason, "triton": triton_reason, "cpp": native_reason, "reference": lambda: None,
    }, preference=DEFAULT_BACKENDS)
    with record_function(SORTING):  # the fused op is mostly its two sorting networks
        if backend == "reference":
            per_row = neco_loss_rows_reference(student_sim, teacher_sim, float(steepness_student),
                                               float(steepness_teacher), network, distribution, float(art_lambda))
        else:
            per_row = _neco_rows_op(student_sim.reshape(-1, n), teacher_sim.reshape(-1, n),
                                    float(steepness_student), float(steepness_teacher), network, distribution,
                                    float(art_lambda), backend)
            per_row = per_row.view(student_sim.shape[:-1])
    return per_row.mean() if reduction == "mean" else per_row
