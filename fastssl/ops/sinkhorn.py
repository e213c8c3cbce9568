"""Sinkhorn-Knopp equipartition (SwAV, DINOv2, Time-Tuning, DoRA): Triton kernels, custom op,
functional API.

Algorithm (see :mod:`fastssl.reference.sinkhorn` for why it equals SwAV's function): with
``x = S * log2(e) / eps`` the kernels keep two log2 scaling vectors in float32 and never
rewrite the (B, K) matrix until the end::

    lse_b = 0
    repeat n_iters:
        lse_k[k] = log2sumexp2_b(x[b,k] - lse_b[b])   # prototype half-iteration (all-reduced)
        lse_b[b] = log2sumexp2_k(x[b,k] - lse_k[k])   # sample half-iteration (local)
    Q[b,k] = exp2(x[b,k] - lse_k[k] - lse_b[b])

Every reduction is an online (running max, rescaled sum) log-sum-exp, so no ``exp`` sees a
positive argument: finite for any finite scores and eps, and equal to the original wherever
the original is finite.

Kernels and memory traffic for a (B, K) problem whose scores have ``e`` bytes per element:

- ``_sinkhorn_single_tile_kernel``: the whole problem in registers (B_pad * K_pad <= 8192),
  one program per problem, all iterations on chip: reads ``B*K*e`` once and writes ``4*B*K``.
  For DoRA-like batches of small problems, where launches would dominate. It iterates in
  the linear domain when the exponents' spread allows (see the kernel).
- ``_partial_logsumexp_kernel``: one half-iteration. Programs tile the kept axis and split
  the reduced axis (tiles of BLOCK_REDUCE x BLOCK_KEEP) so that about four programs run per
  SM; each writes one float per kept index and split. Reads ``B*K*e`` once; the partials
  (n_splits * kept floats) are merged by the same kernel run over the split axis.
- ``_write_assignments_kernel``: the last sample half-iteration fused with the write of Q,
  whole rows per program: reads ``B*K*e`` from memory and writes Q (``4*B*K`` bytes). Rows of
  up to 16384 stay in registers; longer rows are swept twice, the second sweep re-reading
  from L2 what the first has just loaded.

Total: ``2*n_iters`` reads of the scores from memory and one write of Q, against about
``6*n_iters`` read-or-write passes over the float32 matrix in the original.
FLOPs are negligible (about 4 per element per pass, one ``exp2`` among them): the op is
bandwidth-bound and measured against the device's copy bandwidth.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from fastssl import _native
from fastssl._checks import check_finite, check_float_tensor, check_positive_float, check_positive_int
from fastssl.backend import Reason, select_backend
from fastssl.distributed import (
    ProcessGroup,
    all_reduce_logsumexp,
    group_from_name,
    group_name,
    resolve_group,
)
from fastssl.ops.triton_math import programs_per_wave
from fastssl.reference.sinkhorn import sinkhorn_knopp_log_domain

LOG2_E = 1.4426950408889634
SINGLE_TILE_MAX_ELEMENTS = 8192
ROW_TILE_MAX_ELEMENTS = 16384
TILE_ELEMENTS = 4096
SWEEP_TILE_K = 4096
# Default order: Triton before the CUDA kernels until a GPU measurement says otherwise;
# on the CPU the C++ kernels, measured faster than the PyTorch reference (README).
DEFAULT_BACKENDS = ("triton", "cuda", "cpp", "reference")
LINEAR_DOMAIN_MAX_SPREAD = tl.constexpr(100.0)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _masked_log2sumexp2(x, mask, axis: tl.constexpr):
    """log2(sum(exp2(x))) along ``axis`` over the entries where ``mask`` holds; -inf if none."""
    x = tl.where(mask, x, float("-inf"))
    row_max = tl.max(x, axis=axis)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(tl.exp2(x - tl.expand_dims(shift, axis)), axis=axis)
    return shift + tl.log2(total)


@triton.jit
def _online_log2sumexp2_update(running_max, running_sum, x, axis: tl.constexpr):
    """Fold a tile ``x`` (masked entries -inf) into a running (max, rescaled sum) along
    ``axis``; ``running_max + log2(running_sum)`` is the log2-sum-exp2 so far."""
    new_max = tl.maximum(running_max, tl.max(x, axis=axis))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    new_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(
        tl.exp2(x - tl.expand_dims(shift, axis)), axis=axis
    )
    return new_max, new_sum


@triton.jit
def _finish_log2sumexp2(running_max, running_sum):
    return tl.where(running_max == float("-inf"), 0.0, running_max) + tl.log2(running_sum)


@triton.jit
def _sinkhorn_single_tile_kernel(
    scores_ptr, q_ptr, lse_b_ptr,
    B, K,
    stride_sp, stride_sb, stride_sk,
    scale, n_iters,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All Sinkhorn iterations of one problem (program_id 0) with the tile in registers.

    When the tile's exponents span less than LINEAR_DOMAIN_MAX_SPREAD (in log2 units),
    exp2(x - max) cannot underflow to zero nor the normalized matrix overflow, so the
    iterations run in the linear domain like the original, whose per-step rounding is
    relative (about 2**-24) rather than relative to |x| as in the log domain: this matters
    for the many-iteration problems (DoRA: 30) that this kernel serves. Wider spreads fall
    back to the log domain. ``lse_b`` is stored for the finiteness check.
    """
    problem = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < B) & (cols[None, :] < K)
    offsets = rows[:, None] * stride_sb + cols[None, :] * stride_sk
    x = tl.load(scores_ptr + problem * stride_sp + offsets, mask=mask, other=0.0).to(tl.float32)
    x = x * scale

    x_max = tl.max(tl.where(mask, x, float("-inf")))
    x_min = tl.min(tl.where(mask, x, float("inf")))
    if x_max - x_min < LINEAR_DOMAIN_MAX_SPREAD:
        q = tl.where(mask, tl.exp2(x - x_max), 0.0)
        row_sums = tl.sum(q, axis=1)
        for _ in range(n_iters):
            q = q / tl.where(mask, tl.sum(q, axis=0)[None, :], 1.0)
            row_sums = tl.sum(q, axis=1)
            q = q / tl.where(mask, row_sums[:, None], 1.0)
        lse_b = tl.log2(row_sums)
    else:
        lse_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        lse_k = tl.zeros([BLOCK_K], dtype=tl.float32)
        for _ in range(n_iters):
            lse_k = _masked_log2sumexp2(x - lse_b[:, None], mask, 0)
            lse_b = _masked_log2sumexp2(x - lse_k[None, :], mask, 1)
        q = tl.exp2(x - lse_k[None, :] - lse_b[:, None])

    out = problem * B * K + rows[:, None] * K + cols[None, :]
    tl.store(q_ptr + out, q, mask=mask)
    tl.store(lse_b_ptr + problem * B + rows, lse_b, mask=rows < B)


@triton.jit
def _partial_logsumexp_kernel(
    values_ptr, other_lse_ptr, out_ptr,
    n_keep, n_reduce, n_keep_blocks,
    stride_vp, stride_vr, stride_vk,
    scale, reduce_per_split,
    HAS_OTHER: tl.constexpr, BLOCK_REDUCE: tl.constexpr, BLOCK_KEEP: tl.constexpr,
):
    """out[p, split, j] = log2sumexp2 over r in the split of (v[p, r, j] * scale - other[p, r]).

    The reduced and kept axes are given by strides, so one kernel serves the prototype
    half-iteration (reduce over samples), the sample half-iteration (reduce over prototypes)
    and the merge of per-split partials (reduce over splits, scale 1, no ``other``).
    Grid: (n_keep_blocks * n_problems, n_splits). ``out`` is (n_problems, n_splits, n_keep).
    Online log-sum-exp: a running max per kept index and a sum rescaled when it grows.
    """
    keep_block = tl.program_id(0) % n_keep_blocks
    problem = (tl.program_id(0) // n_keep_blocks).to(tl.int64)
    split = tl.program_id(1)

    keep = keep_block * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
    keep_mask = keep < n_keep
    base = values_ptr + problem * stride_vp + keep[None, :].to(tl.int64) * stride_vk

    running_max = tl.full([BLOCK_KEEP], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_KEEP], dtype=tl.float32)
    start = split * reduce_per_split
    end = tl.minimum(start + reduce_per_split, n_reduce)
    for r0 in range(start, end, BLOCK_REDUCE):
        r = r0 + tl.arange(0, BLOCK_REDUCE)
        r_mask = r < end
        mask = r_mask[:, None] & keep_mask[None, :]
        v = tl.load(base + r[:, None].to(tl.int64) * stride_vr, mask=mask, other=0.0)
        x = v.to(tl.float32) * scale
        if HAS_OTHER:
            other = tl.load(other_lse_ptr + problem * n_reduce + r, mask=r_mask, other=0.0)
            x = x - other[:, None]
        x = tl.where(mask, x, float("-inf"))
        running_max, running_sum = _online_log2sumexp2_update(running_max, running_sum, x, 0)

    out = out_ptr + (problem * tl.num_programs(1) + split) * n_keep + keep
    tl.store(out, _finish_log2sumexp2(running_max, running_sum), mask=keep_mask)


@triton.jit
def _row_chunk_logits(scores_ptr, row_offsets, lse_k_ptr, cols, row_mask, K, stride_sk, scale):
    """x = scores * scale - lse_k for columns ``cols`` of whole rows, and the mask of valid
    entries (masked entries of x hold finite filler)."""
    mask = row_mask[:, None] & (cols[None, :] < K)
    s = tl.load(scores_ptr + row_offsets + cols[None, :].to(tl.int64) * stride_sk, mask=mask, other=0.0)
    lse_k = tl.load(lse_k_ptr + cols, mask=cols < K, other=0.0)
    return s.to(tl.float32) * scale - lse_k[None, :], mask


@triton.jit
def _write_assignments_kernel(
    scores_ptr, lse_k_ptr, lse_b_ptr, q_ptr,
    B, K, n_row_blocks,
    stride_sp, stride_sb, stride_sk,
    scale,
    ROW_IN_ONE_TILE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The last sample half-iteration fused with the write of Q, for BLOCK_B whole rows.

    lse_b[p, b] = log2sumexp2_k(x - lse_k[p, k]) is computed, stored (for the finiteness
    check) and applied: Q[p, b, k] = exp2(x - lse_k[p, k] - lse_b[p, b]).
    ROW_IN_ONE_TILE (BLOCK_K >= K): the rows stay in registers between the two steps.
    Otherwise two sweeps over the rows in BLOCK_K chunks: the first folds the online
    log-sum-exp, the second re-reads the same rows, which the first sweep has just
    brought into L2, and writes Q. Grid: (n_row_blocks * n_problems,).
    """
    row_block = tl.program_id(0) % n_row_blocks
    problem = (tl.program_id(0) // n_row_blocks).to(tl.int64)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    row_offsets = problem * stride_sp + rows[:, None].to(tl.int64) * stride_sb
    out_rows = problem * B * K + rows[:, None].to(tl.int64) * K

    lse_k_row = lse_k_ptr + problem * K
    if ROW_IN_ONE_TILE:
        cols = tl.arange(0, BLOCK_K)
        x, mask = _row_chunk_logits(scores_ptr, row_offsets, lse_k_row, cols, row_mask, K, stride_sk, scale)
        lse_b = _masked_log2sumexp2(x, mask, 1)
        tl.store(q_ptr + out_rows + cols[None, :], tl.exp2(x - lse_b[:, None]), mask=mask)
    else:
        running_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x, mask = _row_chunk_logits(scores_ptr, row_offsets, lse_k_row, cols, row_mask, K, stride_sk, scale)
            x = tl.where(mask, x, float("-inf"))
            running_max, running_sum = _online_log2sumexp2_update(running_max, running_sum, x, 1)
        lse_b = _finish_log2sumexp2(running_max, running_sum)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x, mask = _row_chunk_logits(scores_ptr, row_offsets, lse_k_row, cols, row_mask, K, stride_sk, scale)
            tl.store(q_ptr + out_rows + cols[None, :], tl.exp2(x - lse_b[:, None]), mask=mask)
    tl.store(lse_b_ptr + problem * B + rows, lse_b, mask=row_mask)


# ----------------------------------------------------------------------------- launchers


def _num_warps(tile_elements: int) -> int:
    # A 4096-element tile on 8 warps sits at 64 registers per thread and spills on sm_80 or
    # sm_90 (tests/compile_kernels.py): 16 warps from there.
    return 4 if tile_elements <= 2048 else 16


def _logsumexp_reduce(
    values: torch.Tensor,
    reduce_dim: int,
    other_lse: torch.Tensor | None,
    scale: float,
    block_reduce: int,
    block_keep: int,
    launch: bool = True,
) -> torch.Tensor:
    """log2sumexp2 of ``values * scale - other_lse`` over ``reduce_dim`` (1 or 2) of a 3-D
    (problems, d1, d2) tensor, as float32 (problems, kept length). Splits the reduced axis
    when the kept axis alone gives too few programs, then merges the splits."""
    n_problems = values.shape[0]
    keep_dim = 3 - reduce_dim
    n_keep, n_reduce = values.shape[keep_dim], values.shape[reduce_dim]
    block_reduce = min(block_reduce, triton.next_power_of_2(n_reduce))
    block_keep = min(block_keep, triton.next_power_of_2(n_keep))
    n_keep_blocks = triton.cdiv(n_keep, block_keep)
    reduce_blocks = triton.cdiv(n_reduce, block_reduce)
    wanted = triton.cdiv(programs_per_wave(values.device, elsewhere=8), n_keep_blocks * n_problems)
    n_splits = max(1, min(reduce_blocks, wanted))
    reduce_per_split = triton.cdiv(reduce_blocks, n_splits) * block_reduce
    n_splits = triton.cdiv(n_reduce, reduce_per_split)

    out = torch.empty((n_problems, n_splits, n_keep), device=values.device, dtype=torch.float32)
    if launch:
        _partial_logsumexp_kernel[(n_keep_blocks * n_problems, n_splits)](
            values, other_lse, out,
            n_keep, n_reduce, n_keep_blocks,
            values.stride(0), values.stride(reduce_dim), values.stride(keep_dim),
            scale, reduce_per_split,
            HAS_OTHER=other_lse is not None,
            BLOCK_REDUCE=block_reduce, BLOCK_KEEP=block_keep,
            num_warps=_num_warps(block_reduce * block_keep),
        )
    if n_splits == 1:
        return out.view(n_problems, n_keep)
    return _logsumexp_reduce(out, 1, None, 1.0, block_reduce=64, block_keep=64, launch=launch)


def _prototype_half_iteration(scores, lse_b, scale, group, launch):
    lse_k = _logsumexp_reduce(scores, 1, lse_b, scale, block_reduce=32, block_keep=128, launch=launch)
    return all_reduce_logsumexp(lse_k, group, base2=True)


def _sample_half_iteration(scores, lse_k, scale, launch):
    return _logsumexp_reduce(scores, 2, lse_k, scale, block_reduce=512, block_keep=8, launch=launch)


def _sinkhorn_triton(scores: torch.Tensor, eps: float, n_iters: int, group: ProcessGroup, launch: bool = True):
    """Launch the kernels on a (problems, B, K) tensor. Returns (Q float32, lse_b float32).
    ``launch=False`` (the fake): the same allocations, no kernel and no communication (the
    all-reduces' temporaries are K floats per problem)."""
    n_problems, B, K = scores.shape
    scale = LOG2_E / eps
    q = torch.empty((n_problems, B, K), device=scores.device, dtype=torch.float32)
    strides = scores.stride()
    block_b, block_k = triton.next_power_of_2(B), triton.next_power_of_2(K)

    if group is None and block_b * block_k <= SINGLE_TILE_MAX_ELEMENTS:
        lse_b = torch.empty((n_problems, B), device=scores.device, dtype=torch.float32)
        if launch:
            _sinkhorn_single_tile_kernel[(n_problems,)](
                scores, q, lse_b, B, K, *strides, scale, n_iters,
                BLOCK_B=block_b, BLOCK_K=block_k, num_warps=_num_warps(block_b * block_k),
            )
        return q, lse_b

    group = group if launch else None
    lse_b = torch.zeros((n_problems, B), device=scores.device, dtype=torch.float32)
    for iteration in range(n_iters):
        lse_k = _prototype_half_iteration(scores, lse_b, scale, group, launch)
        if iteration < n_iters - 1:  # the last sample half-iteration is fused with the write
            lse_b = _sample_half_iteration(scores, lse_k, scale, launch)

    row_in_one_tile = block_k <= ROW_TILE_MAX_ELEMENTS
    tile_k = block_k if row_in_one_tile else SWEEP_TILE_K
    rows_per_program = max(1, min(TILE_ELEMENTS // tile_k, block_b))
    n_row_blocks = triton.cdiv(B, rows_per_program)
    lse_b = torch.empty((n_problems, B), device=scores.device, dtype=torch.float32)
    if not launch:
        return q, lse_b
    _write_assignments_kernel[(n_row_blocks * n_problems,)](
        scores, lse_k, lse_b, q, B, K, n_row_blocks, *strides, scale,
        ROW_IN_ONE_TILE=row_in_one_tile, BLOCK_B=rows_per_program, BLOCK_K=tile_k,
        num_warps=_num_warps(rows_per_program * tile_k),
    )
    return q, lse_b


def _sinkhorn_native(scores: torch.Tensor, eps: float, n_iters: int, group: ProcessGroup):
    """The same half-iterations with the kernels of ``fastssl._C`` (CUDA on a GPU, C++ on the
    CPU; csrc/sinkhorn_cpu.cpp, kernels/sinkhorn.cu). Returns (Q float32, lse_b float32)."""
    C = _native.native()
    n_problems, B, K = scores.shape
    view = C.ScoresView(scores.data_ptr(), _native.DTYPE_CODES[scores.dtype], n_problems, B, K, *scores.stride())
    scale = LOG2_E / eps
    lse_b = torch.zeros((n_problems, B), device=scores.device, dtype=torch.float32)
    lse_k = torch.empty((n_problems, K), device=scores.device, dtype=torch.float32)
    q = torch.empty((n_problems, B, K), device=scores.device, dtype=torch.float32)
    if scores.is_cuda:
        stream = _native.stream_of(scores)
        column_blocks = max(1, triton.cdiv(K, 256))
        splits = max(1, min(triton.cdiv(B, 64), programs_per_wave(scores.device, elsewhere=8) // column_blocks))
        workspace = torch.empty(2 * n_problems * splits * K, device=scores.device, dtype=torch.float32)

        def prototype_half(lse_b, lse_k):
            C.sinkhorn_col_lse_cuda(view, scale, lse_b.data_ptr(), lse_k.data_ptr(), workspace.data_ptr(), splits,
                                    stream)

        def sample_half(lse_k, lse_b):
            C.sinkhorn_row_lse_cuda(view, scale, lse_k.data_ptr(), lse_b.data_ptr(), stream)

        def write(lse_k, lse_b, q):
            C.sinkhorn_write_cuda(view, scale, lse_k.data_ptr(), lse_b.data_ptr(), q.data_ptr(), stream)
    else:
        if group is None and C.sinkhorn_linear_cpu(view, scale, n_iters, q.data_ptr(), lse_b.data_ptr()):
            return q, lse_b

        def prototype_half(lse_b, lse_k):
            C.sinkhorn_col_lse_cpu(view, scale, lse_b.data_ptr(), lse_k.data_ptr())

        def sample_half(lse_k, lse_b):
            C.sinkhorn_row_lse_cpu(view, scale, lse_k.data_ptr(), lse_b.data_ptr())

        def write(lse_k, lse_b, q):
            C.sinkhorn_write_cpu(view, scale, lse_k.data_ptr(), lse_b.data_ptr(), q.data_ptr())

    for iteration in range(n_iters):
        prototype_half(lse_b, lse_k)
        lse_k = all_reduce_logsumexp(lse_k, group, base2=True)
        if iteration < n_iters - 1:  # the last sample half-iteration is fused with the write
            sample_half(lse_k, lse_b)
    write(lse_k, lse_b, q)
    return q, lse_b


# ----------------------------------------------------------------------------- custom op


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raise_if_not_finite(lse_b: torch.Tensor) -> None:
    # A NaN or +inf anywhere in the scores (or a prototype column that is -inf for every
    # sample, where the original divides 0 by 0) makes every sample's normalizer
    # non-finite, so this small vector tells about the whole input.
    check_finite("scores", lse_b, "a NaN or +inf score, or a prototype whose scores are all -inf, "
                                  "makes the original return NaN")


def _native_allocations(scores: torch.Tensor):
    """What :func:`_sinkhorn_native` allocates, for the fake: lse_b, lse_k, Q and on a GPU the
    column pass's split workspace. Returns (Q, lse_b)."""
    n_problems, B, K = scores.shape
    f32 = dict(device=scores.device, dtype=torch.float32)
    lse_b = torch.zeros((n_problems, B), **f32)
    held = [torch.empty((n_problems, K), **f32)]  # lse_k
    q = torch.empty((n_problems, B, K), **f32)
    if scores.is_cuda:
        column_blocks = max(1, triton.cdiv(K, 256))
        splits = max(1, min(triton.cdiv(B, 64), programs_per_wave(scores.device, elsewhere=8) // column_blocks))
        held.append(torch.empty(2 * n_problems * splits * K, **f32))
    return q, lse_b  # what ``held`` holds is freed here, as the launcher's are at its return


def _sinkhorn_knopp(scores: torch.Tensor, eps: float, n_iters: int, group: str, backend: str,
                    launch: bool = True) -> torch.Tensor:
    problems = scores.reshape(-1, *scores.shape[-2:])
    if backend == "triton":
        q, lse_b = _sinkhorn_triton(problems, eps, n_iters, group_from_name(group) if launch else None, launch)
    elif not launch:
        q, lse_b = _native_allocations(problems)
    else:
        with torch.cuda.device(scores.device) if scores.is_cuda else contextlib.nullcontext():
            q, lse_b = _sinkhorn_native(problems, eps, n_iters, group_from_name(group))
    _raise_if_not_finite(lse_b)
    return q.view(scores.shape)


@torch.library.custom_op("fastssl::sinkhorn_knopp", mutates_args=())
def _sinkhorn_knopp_op(scores: torch.Tensor, eps: float, n_iters: int, group: str, backend: str) -> torch.Tensor:
    return _sinkhorn_knopp(scores, eps, n_iters, group, backend)


@_sinkhorn_knopp_op.register_fake
def _(scores, eps, n_iters, group, backend):
    # The launcher without its kernels: Q (float32), the log-sum-exp vectors and the
    # half-iterations' per-split partials, each alive as long as in the launcher, and the
    # finiteness check's temporaries.
    return _sinkhorn_knopp(scores, eps, n_iters, group, backend, launch=False)


# ----------------------------------------------------------------------------- functional API


def _why_not_triton(scores: torch.Tensor) -> Reason:
    if scores.dtype == torch.float64:
        return "the kernels compute in float32; float64 input runs on the reference backend"
    return None


def sinkhorn_knopp(
    scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, group: ProcessGroup = None
) -> torch.Tensor:
    """Balanced soft assignment of samples to prototypes (SwAV's ``distributed_sinkhorn``).

    Args:
        scores: (..., B, K) sample-to-prototype scores (logits), any float dtype and strides.
            Leading dimensions are independent problems (e.g. DoRA's (batch, 196, 3)).
        eps: temperature; the originals use 0.05 (SwAV) or the teacher temperature (DINOv2).
        n_iters: Sinkhorn iterations (3 in SwAV and DINOv2).
        group: process group over which the B dimension is split. ``None`` means the
            default group when torch.distributed is initialized (as in the originals), else
            no communication. Only the K-length normalizers are all-reduced.
    Returns:
        Q of shape (..., B, K), float32 (float64 for float64 input), each row summing to one
        and each prototype receiving about B_global / K of the mass. Q carries no gradient
        (the originals run under ``torch.no_grad``); ``scores`` may require grad.

    Unlike the originals it never overflows: it is computed in the log domain, equal to them
    wherever they are finite. NaN or +inf in ``scores`` stops it (:func:`fastssl._checks.check_finite`:
    a ValueError on the CPU, a device-side assert on a GPU).
    """
    check_float_tensor("scores", scores, min_dim=2)
    eps = check_positive_float("eps", eps)
    n_iters = check_positive_int("n_iters", n_iters)
    group = resolve_group(group)
    backend = select_backend(
        "sinkhorn_knopp",
        scores.device,
        {
            "cuda": lambda: _native.dtype_reason(scores),
            "triton": lambda: _why_not_triton(scores),
            "cpp": lambda: _native.dtype_reason(scores),
            "reference": lambda: None,
        },
        preference=DEFAULT_BACKENDS,
    )
    scores = scores.detach()
    if backend != "reference":
        return _sinkhorn_knopp_op(scores, eps, n_iters, group_name(group), backend)
    with torch.no_grad():
        q, lse_b = sinkhorn_knopp_log_domain(scores, eps, n_iters, group)
    _raise_if_not_finite(lse_b)
    return q


def sinkhorn_knopp_bytes(shape, dtype: torch.dtype, n_iters: int) -> int:
    """Bytes one single-process call must move: one float32 write of Q and the reads of the
    scores, ``2 * n_iters`` of them, or one where the problem fits the single-tile kernel.
    Used by the benchmarks as the bandwidth bound."""
    single_tile = triton.next_power_of_2(shape[-2]) * triton.next_power_of_2(shape[-1])
    reads = 1 if single_tile <= SINGLE_TILE_MAX_ELEMENTS else 2 * n_iters
    return math.prod(shape) * (reads * torch.empty((), dtype=dtype).element_size() + 4)
