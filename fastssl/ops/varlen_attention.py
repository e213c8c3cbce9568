"""Multi-crop packed ("varlen") attention: Triton kernels, custom ops, functional API.

Sequences of different lengths (DINO's 2 global crops of 197 tokens and 10 local crops of 37,
DINOv2's 257 and 50, NeCo's 1370 and 50) are packed along the token axis of
``(total_tokens, heads, head_dim)`` tensors and delimited by ``cu_seqlens``; every sequence
attends to itself only (REFERENCE.md section 6, :mod:`fastssl.reference.attention`)::

    out[s] = softmax(q[s] k[s]^T * scale) v[s]

Algorithm: the online softmax (running row maximum and rescaled row sum, as in
FlashAttention), in the log2 domain (``x = q.k * scale * log2(e)``, ``exp2``), with float32
accumulation and the P@V, dS@Q and dS^T@K products fed to the tensor cores in the input
dtype. The forward saves only the output and the per-row log2-sum-exp2 (``lse``, float32,
``(heads, total_tokens)``); the backward recomputes P from them.

Tile schedule by length class (what a padded 128 x 128 tile per sequence wastes at these
lengths is the point of this op). Sequences are split into classes by length; each class
has its own tile shape, and each launch of a kernel serves one class:

    length        forward tile      backward tiles     useful share of the computed scores
    1 .. 64       64 x 16 (keys)    64 x 16            37: 45%, 50: 61%  (128-tile: 8%, 15%)
    65 .. 512     64 x 32           64 x 32            197: 68%, 257: 72% (128-tile: 59%, 45%)
    513 ..        128 x 64          128 x 32           1370: 95%  (128-tile: 95%)

A tile is ROWS consecutive tokens of one sequence (the queries of a forward or dQ program,
the keys of a dK/dV program); the program sweeps the other axis of the same sequence in
blocks of COLS, so a tile is padded to ROWS rows and the sweep to a multiple of COLS, never
to 128 x 128. ``_schedule_kernel`` (one program per class, one launch) writes the tile table
of every class from ``cu_seqlens`` on the device: no host synchronization, not even for
``max_seqlen``, which only shrinks the grids (each launch's grid is an upper bound on its
class's tiles computed from shapes, the tiles on grid axis 0 and the heads on axis 1;
programs past the table's end return at once).

Packing several short sequences into one tile with a block-diagonal mask inside it (the
other known remedy) is not done: with k sequences of n tokens in a tile, k * n^2 of the
(k * n)^2 scores are useful, 1 / k of them, so it only pays when one sequence alone fills
less than 1 / k of the smallest efficient tile (n <= 16 at 64 rows); at 37 and 50 tokens a
64-row tile per sequence with 16-key blocks computes fewer scores than any packing.

Kernels (per head; n_i the sequence lengths, d the head dim, e bytes per element,
T = sum n_i tokens; FLOPs counted as FlashAttention does, 2 per multiply-add):

- ``_schedule_kernel``: the tile tables, O(n_seqs) work, one launch for all classes.
- ``_forward_kernel``: grid (query tiles, heads). Per tile: Q once, K and V of its
  sequence once (from L2 for all but the first tile of a sequence), O and the lse once.
  FLOPs 4 * n_i^2 * d per sequence; memory ``4*T*d*e`` (Q, K, V, O) + ``4*T`` (lse).
- ``_delta_kernel``: ``delta = rowsum(dO * O)`` in float32, reads ``2*T*d*e``.
- ``_dkdv_kernel``: grid (key tiles, heads); sweeps the sequence's query blocks,
  recomputing P, and accumulates dK and dV in registers (so each is written once, in a
  fixed order: deterministic). With ``ATOMIC_DQ`` it also adds each block's dQ share to a
  float32 buffer with atomics (the order of float additions varies from run to run).
  FLOPs 8 * n_i^2 * d (10 with the atomic dQ).
- ``_dq_kernel`` (``deterministic=True``): grid (query tiles, heads); sweeps the key
  blocks, recomputing P and dP: 6 * n_i^2 * d more FLOPs than the atomic path's 2, and no
  float32 dQ buffer (``4*T*d`` bytes, zeroed, then read back and converted).

Backward total: about 2.5x the forward's FLOPs (atomics) or 3.5x (deterministic).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from fastssl import _checks
from fastssl._checks import check_float_tensor, check_positive_float, check_positive_int
from fastssl.backend import Reason, select_backend, triton_interpreter_enabled
from fastssl.ops.launch import first_that_fits
from fastssl.ops.triton_math import mma
from fastssl.profiling import ATTENTION
from fastssl.reference.attention import varlen_attention_reference

LOG2_E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (32, 64, 128)
SCHEDULE_BLOCK = 1024
TABLE_FIELDS = 4  # per tile: first token of its sequence, sequence length, first row, sequence index


class TileShape(NamedTuple):
    rows: int  # tokens of the sequence a program owns (queries; keys for dK/dV)
    cols: int  # block of the swept axis (keys; queries for dK/dV)
    num_warps: int


class LengthClass(NamedTuple):
    max_len: int  # sequences longer than the previous class's max_len, up to this
    forward: tuple[TileShape, ...]  # candidates, best first
    backward: tuple[TileShape, ...]


LONGEST = 2**31 - 1
SMALLER_TILES = (TileShape(64, 32, 4), TileShape(64, 16, 4), TileShape(32, 16, 4), TileShape(32, 16, 8))


def length_classes(head_dim: int, element_size: int) -> tuple[LengthClass, ...]:
    """The candidate tile shapes per length class, best first (see the module docstring);
    each launch takes the first that fits its device without spilling registers
    (:func:`fastssl.ops.launch.first_that_fits`). The first choices: rows of 256 bytes or
    more (head_dim 128 in 16 bits, 64 in float32) halve the long class's tiles to stay within
    the shared memory of sm_80, and the long class's backward sweeps 32 queries per step with
    8 warps (a 64 x 64 step with 4 warps spills on sm_80 and sm_90). Smaller tiles follow
    for GPUs with less shared memory or fewer registers to spare: T4's 64 KiB, or where the
    compiler spills those (sm_86, sm_89, sm_120, gfx942; tests/compile_kernels.py), the last
    on 8 warps for sm_70, whose FMA dots spill every 4-warp tile."""
    wide = head_dim * element_size >= 256

    def then_smaller(first: TileShape) -> tuple[TileShape, ...]:
        return (first, *[shape for shape in SMALLER_TILES if shape.rows * shape.cols < first.rows * first.cols])

    return (
        LengthClass(64, then_smaller(TileShape(64, 16, 4)), then_smaller(TileShape(64, 16, 4))),
        LengthClass(512, then_smaller(TileShape(64, 32, 4)), then_smaller(TileShape(64, 32, 4))),
        LengthClass(LONGEST, then_smaller(TileShape(64, 32, 4) if wide else TileShape(128, 64, 8)),
                    then_smaller(TileShape(64, 32, 4) if wide else TileShape(128, 32, 8))),
    )


# ----------------------------------------------------------------------------- kernels


@triton.jit(debug=True)  # for the device-side assert at its end; O(n_seqs) work, so it costs nothing
def _schedule_kernel(
    cu_seqlens_ptr, table_ptr,
    n_seqs, total_tokens, table_stride,
    shorter0, longest0, rows0, capacity0, shorter1, longest1, rows1, capacity1,
    shorter2, longest2, rows2, capacity2,
    BLOCK: tl.constexpr, FIELDS: tl.constexpr,
):
    """Tile table of the length class program_id(0) (three, given as scalars so that no
    parameter tensor is copied to the device).

    A class holds the sequences of length in (shorter, longest], tiled by ``rows`` tokens,
    at most ``capacity`` tiles. Table entry p of the class: (first token of the sequence,
    its length, first row of the tile, sequence index); entries past the class's tiles get
    length 0. Token offsets are clamped to [0, total_tokens], so malformed ``cu_seqlens``
    that skipped validation cannot make the attention kernels read or write out of bounds.

    The capacity is an upper bound on the class's tiles from shapes and ``max_seqlen``. A
    ``max_seqlen`` shorter than a real sequence (or overlapping offsets) makes the tiles
    outnumber it; the tiles past it would get no program, and their rows of the outputs
    would keep whatever memory held. That stops here, in a device-side assert (no host
    synchronization): a class launched with capacity 0 still runs this program.
    """
    c = tl.program_id(0)
    shorter = tl.where(c == 0, shorter0, tl.where(c == 1, shorter1, shorter2))
    longest = tl.where(c == 0, longest0, tl.where(c == 1, longest1, longest2))
    rows = tl.where(c == 0, rows0, tl.where(c == 1, rows1, rows2))
    capacity = tl.where(c == 0, capacity0, tl.where(c == 1, capacity1, capacity2))
    table = table_ptr + c * table_stride
    filled = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for first in range(0, n_seqs, BLOCK):
        seq = first + tl.arange(0, BLOCK)
        in_range = seq < n_seqs
        start = tl.load(cu_seqlens_ptr + seq, mask=in_range, other=0)
        end = tl.load(cu_seqlens_ptr + seq + 1, mask=in_range, other=0)
        start = tl.minimum(tl.maximum(start, 0), total_tokens)
        end = tl.minimum(tl.maximum(end, start), total_tokens)
        length = end - start
        member = in_range & (length > shorter) & (length <= longest)
        tiles = tl.where(member, (length + rows - 1) // rows, 0)
        slot = filled + tl.cumsum(tiles, axis=0) - tiles
        for j in range(0, tl.max(tiles, axis=0)):
            entry = table + (slot + j) * FIELDS
            keep = (j < tiles) & (slot + j < capacity)
            tl.store(entry, start, mask=keep)
            tl.store(entry + 1, length, mask=keep)
            tl.store(entry + 2, j * rows, mask=keep)
            tl.store(entry + 3, seq, mask=keep)
        filled += tl.sum(tiles, axis=0)
    for first in range(filled, capacity, BLOCK):
        p = first + tl.arange(0, BLOCK)
        tl.store(table + p * FIELDS + 1, tl.zeros([BLOCK], dtype=tl.int32), mask=p < capacity)
    tl.device_assert(filled <= capacity, "varlen_attention: a sequence is longer than max_seqlen, or cu_seqlens "
                                         "is malformed; validate=True names the fault")


@triton.jit
def _cast(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """``x.to(dtype)``. The Triton interpreter truncates float32 -> bfloat16 conversions where
    GPUs round to nearest even; with ``RNE_BF16`` (set under the interpreter only) the
    rounding is done on the bits first, so CPU tests see the GPU's numerics."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile(table_ptr, ROWS: tl.constexpr):
    """This program's tile (grid axis 0; the head is axis 1): (first token of its sequence,
    sequence length, row indices)."""
    entry = table_ptr + tl.program_id(0) * 4
    start = tl.load(entry)
    length = tl.load(entry + 1)
    rows = tl.load(entry + 2) + tl.arange(0, ROWS)
    return start, length, rows


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, table_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens, qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """Output rows and lse of one query tile (BLOCK_M tokens of one sequence), one head.

    Sweeps the sequence's keys in blocks of BLOCK_N with the online softmax in registers:
    acc (BLOCK_M x HEAD_DIM) float32, row max m and row sum l. Padding rows load zeros and
    are never stored; padding key columns get a score of -inf.
    """
    head = tl.program_id(1)
    start, length, rows = _tile(table_ptr, BLOCK_M)
    if length == 0:
        return
    dims = tl.arange(0, HEAD_DIM)
    row_mask = rows < length
    tokens = (start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for col0 in range(0, length, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < length
        key_tokens = (start + cols).to(tl.int64)
        k_t = tl.load(k_ptr + key_tokens[None, :] * stride_kt + head * stride_kh + dims[:, None],
                      mask=col_mask[None, :], other=0.0)
        s = mma(q, k_t, None, UPCAST) * qk_scale2
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a valid column
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + key_tokens[:, None] * stride_vt + head * stride_vh + dims[None, :],
                    mask=col_mask[:, None], other=0.0)
        acc = mma(_cast(p, v.dtype, RNE_BF16), v, acc * alpha[:, None], UPCAST)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             _cast(out, out_ptr.dtype.element_ty, RNE_BF16), mask=row_mask[:, None])
    tl.store(lse_ptr + head * total_tokens + tokens, m + tl.log2(l), mask=row_mask)


@triton.jit
def _delta_kernel(
    out_ptr, grad_out_ptr, delta_ptr,
    total_tokens, stride_ot, stride_oh, stride_gt, stride_gh,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """delta[head, t] = sum_d dO[t, head, d] * O[t, head, d] in float32 (the softmax
    backward's row term), for BLOCK tokens (program_id(0)) of head program_id(1)."""
    head = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = tokens < total_tokens
    dims = tl.arange(0, HEAD_DIM)
    t64 = tokens.to(tl.int64)[:, None]
    o = tl.load(out_ptr + t64 * stride_ot + head * stride_oh + dims[None, :], mask=mask[:, None], other=0.0)
    do = tl.load(grad_out_ptr + t64 * stride_gt + head * stride_gh + dims[None, :], mask=mask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + head * total_tokens + tokens, delta, mask=mask)


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, table_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, qk_scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """dK and dV of one key tile (BLOCK_N tokens of one sequence), one head; with
    ATOMIC_DQ also every query's dQ share from these keys, added to a float32 buffer.

    Sweeps the sequence's queries in blocks of BLOCK_M, in transposed form (keys on rows):
    P^T = exp2(K Q^T * scale2 - lse), dV += P^T dO, dP^T = V dO^T,
    dS^T = P^T * (dP^T - delta), dK += dS^T Q (times scale at the end), dQ += dS K * scale.
    P is masked to 0 outside the sequence on both axes. Padding queries load zero q, dO and
    delta. Padding keys (rows past the sequence) load zero k, so their unmasked score would
    be 0 and exp2(0 - lse) unbounded for a query row whose logits are all very negative
    (the softmax is shift-invariant, so such rows are legitimate): in 16 bits dS^T would
    overflow to inf there, and inf * 0 in dS K would make the query's dQ NaN.
    """
    head = tl.program_id(1)
    start, length, rows = _tile(table_ptr, BLOCK_N)
    if length == 0:
        return
    dims = tl.arange(0, HEAD_DIM)
    key_mask = rows < length
    key_tokens = (start + rows).to(tl.int64)
    k = tl.load(k_ptr + key_tokens[:, None] * stride_kt + head * stride_kh + dims[None, :],
                mask=key_mask[:, None], other=0.0)
    v = tl.load(v_ptr + key_tokens[:, None] * stride_vt + head * stride_vh + dims[None, :],
                mask=key_mask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for col0 in range(0, length, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_mask = cols < length
        tokens = (start + cols).to(tl.int64)
        q_t = tl.load(q_ptr + tokens[None, :] * stride_qt + head * stride_qh + dims[:, None],
                      mask=col_mask[None, :], other=0.0)
        do = tl.load(grad_out_ptr + tokens[:, None] * stride_gt + head * stride_gh + dims[None, :],
                     mask=col_mask[:, None], other=0.0)
        lse = tl.load(lse_ptr + head * total_tokens + tokens, mask=col_mask, other=0.0)
        delta = tl.load(delta_ptr + head * total_tokens + tokens, mask=col_mask, other=0.0)
        s_t = mma(k, q_t, None, UPCAST) * qk_scale2
        p_t = tl.where(key_mask[:, None] & col_mask[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv = mma(_cast(p_t, do.dtype, RNE_BF16), do, dv, UPCAST)
        dp_t = mma(v, tl.trans(do), None, UPCAST)
        ds_t = _cast(p_t * (dp_t - delta[None, :]), q_t.dtype, RNE_BF16)
        dk = mma(ds_t, tl.trans(q_t), dk, UPCAST)
        if ATOMIC_DQ:
            dq = mma(tl.trans(ds_t), k, None, UPCAST) * scale
            tl.atomic_add(dq_ptr + tokens[:, None] * stride_dqt + head * stride_dqh + dims[None, :], dq,
                          mask=col_mask[:, None], sem="relaxed")
    tl.store(dk_ptr + key_tokens[:, None] * stride_dkt + head * stride_dkh + dims[None, :],
             _cast(dk * scale, dk_ptr.dtype.element_ty, RNE_BF16), mask=key_mask[:, None])
    tl.store(dv_ptr + key_tokens[:, None] * stride_dvt + head * stride_dvh + dims[None, :],
             _cast(dv, dv_ptr.dtype.element_ty, RNE_BF16), mask=key_mask[:, None])


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_ptr, table_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
    stride_dqt, stride_dqh,
    total_tokens, qk_scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """dQ of one query tile, one head, without atomics: sweeps the sequence's key blocks,
    recomputing P = exp2(Q K^T * scale2 - lse) and dP = dO V^T, and accumulates
    dQ += (P * (dP - delta)) K in registers."""
    head = tl.program_id(1)
    start, length, rows = _tile(table_ptr, BLOCK_M)
    if length == 0:
        return
    dims = tl.arange(0, HEAD_DIM)
    row_mask = rows < length
    tokens = (start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    do = tl.load(grad_out_ptr + tokens[:, None] * stride_gt + head * stride_gh + dims[None, :],
                 mask=row_mask[:, None], other=0.0)
    lse = tl.load(lse_ptr + head * total_tokens + tokens, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + head * total_tokens + tokens, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for col0 in range(0, length, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < length
        key_tokens = (start + cols).to(tl.int64)
        k = tl.load(k_ptr + key_tokens[:, None] * stride_kt + head * stride_kh + dims[None, :],
                    mask=col_mask[:, None], other=0.0)
        v_t = tl.load(v_ptr + key_tokens[None, :] * stride_vt + head * stride_vh + dims[:, None],
                      mask=col_mask[None, :], other=0.0)
        s = mma(q, tl.trans(k), None, UPCAST) * qk_scale2
        p = tl.where(col_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, v_t, None, UPCAST)
        ds = _cast(p * (dp - delta[:, None]), k.dtype, RNE_BF16)
        dq = mma(ds, k, dq, UPCAST)
    tl.store(dq_ptr + tokens[:, None] * stride_dqt + head * stride_dqh + dims[None, :],
             _cast(dq * scale, dq_ptr.dtype.element_ty, RNE_BF16), mask=row_mask[:, None])


# ----------------------------------------------------------------------------- launchers


def _class_capacity(total_tokens: int, n_seqs: int, shorter: int, longest: int, rows: int,
                    max_seqlen: int) -> int:
    """An upper bound on the tiles of a class from shapes (and max_seqlen when given):
    its sequences are longer than ``shorter``, so there are at most T // (shorter + 1) of
    them, and sum(ceil(n / rows)) <= ceil(T / rows) + their count."""
    if max_seqlen and max_seqlen <= shorter:
        return 0
    members = min(n_seqs, total_tokens // (shorter + 1))
    capacity = triton.cdiv(total_tokens, rows) + members
    if max_seqlen:
        capacity = min(capacity, members * triton.cdiv(min(max_seqlen, longest), rows))
    return capacity


def _schedule_plans(total_tokens: int, n_seqs: int, max_seqlen: int, shapes) -> list[tuple]:
    """(shortest excluded, longest, tile shape, capacity) per class, from shapes alone."""
    plans, shorter = [], 0
    for max_len, shape in shapes:
        capacity = _class_capacity(total_tokens, n_seqs, shorter, max_len, shape.rows, max_seqlen)
        plans.append((shorter, max_len, shape, capacity))
        shorter = max_len
    return plans


def _empty_table(cu_seqlens: torch.Tensor, plans) -> torch.Tensor:
    stride = max(plan[3] for plan in plans) * TABLE_FIELDS
    return torch.empty((len(plans), stride), dtype=torch.int32, device=cu_seqlens.device)


def _fake_table(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, which: str) -> torch.Tensor:
    """The tile table a launch of ``which`` ("forward" or "backward") allocates, for the
    fakes: with each class's first candidate tile (what the interpreter takes, and a GPU where
    it fits; the table holds a few int32 per tile either way)."""
    shapes = [(length_class.max_len, getattr(length_class, which)[0])
              for length_class in length_classes(q.shape[-1], q.element_size())]
    return _empty_table(cu_seqlens, _schedule_plans(q.shape[0], cu_seqlens.shape[0] - 1, max_seqlen, shapes))


def _schedule(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int, shapes):
    """Per class with any possible tile: (tile shape, table view (capacity, 4)), built by one
    launch of ``_schedule_kernel`` on cu_seqlens' device without reading it on the host.
    ``shapes``: (the class's max_len, its tile shape) per class. Every class gets a program
    there, those of capacity 0 too, so that a sequence the capacities leave out stops the
    kernel instead of going unscheduled."""
    n_seqs = cu_seqlens.shape[0] - 1
    plans = _schedule_plans(total_tokens, n_seqs, max_seqlen, shapes)
    table = _empty_table(cu_seqlens, plans)
    stride = table.shape[1]
    scalars = [value for lo, hi, shape, capacity in plans for value in (lo, hi, shape.rows, capacity)]
    _schedule_kernel[(len(plans),)](
        cu_seqlens, table, n_seqs, total_tokens, stride, *scalars,
        BLOCK=SCHEDULE_BLOCK, FIELDS=TABLE_FIELDS, num_warps=4,
    )
    return [(shape, table[i, : capacity * TABLE_FIELDS])
            for i, (_, _, shape, capacity) in enumerate(plans) if capacity > 0]


def _kernel_options(q: torch.Tensor) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        UPCAST=triton_interpreter_enabled(),
        RNE_BF16=q.dtype == torch.bfloat16 and triton_interpreter_enabled(),
    )


def _chosen_shapes(q, which: str, launches, variant=None) -> list[tuple[int, TileShape]]:
    """(max_len, the tile shape its launches take on q's device) per length class, from its
    ``which`` ("forward" or "backward") candidates; ``launches(shape)``: the (kernel, args,
    kwargs) a class's tiles of ``shape`` launch (any int32 tensor stands for the tile table);
    ``variant``: what else changes the kernels launched."""
    return [(length_class.max_len, first_that_fits(
        ("varlen_attention", which, variant, q.dtype, q.shape[-1], length_class.max_len), q.device,
        getattr(length_class, which), launches)) for length_class in length_classes(q.shape[-1], q.element_size())]


def _forward_triton(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    total_tokens, heads, head_dim = q.shape
    out = torch.empty((total_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_tokens), dtype=torch.float32, device=q.device)

    def arguments(table):
        return (q, k, v, out, lse, table, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                v.stride(1), out.stride(0), out.stride(1), total_tokens, scale * LOG2_E)

    def options(shape: TileShape) -> dict:
        return dict(BLOCK_M=shape.rows, BLOCK_N=shape.cols, num_warps=shape.num_warps, **_kernel_options(q))

    shapes = _chosen_shapes(q, "forward", lambda shape: [(_forward_kernel, arguments(cu_seqlens), options(shape))])
    for shape, table in _schedule(cu_seqlens, total_tokens, max_seqlen, shapes):
        _forward_kernel[(table.shape[0] // TABLE_FIELDS, heads)](*arguments(table), **options(shape))
    return out, lse


DELTA_BLOCK = 64


def _backward_triton(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float,
                     deterministic: bool):
    total_tokens, heads, head_dim = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    delta = torch.empty((heads, total_tokens), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(total_tokens, DELTA_BLOCK), heads)](
        out, grad_out, delta, total_tokens, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        HEAD_DIM=head_dim, BLOCK=DELTA_BLOCK, num_warps=8,  # 4 warps spill in float16 on sm_90
    )
    dk = torch.empty((total_tokens, heads, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((total_tokens, heads, head_dim), dtype=v.dtype, device=q.device)
    if deterministic:
        dq = dq_buffer = torch.empty((total_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    else:
        dq_buffer = torch.zeros((total_tokens, heads, head_dim), dtype=torch.float32, device=q.device)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              grad_out.stride(0), grad_out.stride(1), dq_buffer.stride(0), dq_buffer.stride(1))

    def launches(shape: TileShape, table) -> list:
        """(kernel, args, kwargs) of one class's tiles: dK/dV (and dQ), ``shape.rows`` per tile."""
        options = dict(num_warps=shape.num_warps, **_kernel_options(q))
        dkdv = (_dkdv_kernel, (q, k, v, grad_out, lse, delta, dq_buffer, dk, dv, table, *common, dk.stride(0),
                               dk.stride(1), dv.stride(0), dv.stride(1), total_tokens, scale * LOG2_E, scale),
                dict(BLOCK_N=shape.rows, BLOCK_M=shape.cols, ATOMIC_DQ=not deterministic, **options))
        if not deterministic:
            return [dkdv]
        return [dkdv, (_dq_kernel, (q, k, v, grad_out, lse, delta, dq, table, *common, total_tokens,
                                    scale * LOG2_E, scale), dict(BLOCK_M=shape.rows, BLOCK_N=shape.cols, **options))]

    shapes = _chosen_shapes(q, "backward", lambda shape: launches(shape, cu_seqlens), variant=deterministic)
    for shape, table in _schedule(cu_seqlens, total_tokens, max_seqlen, shapes):
        for kernel, args, kwargs in launches(shape, table):
            kernel[(table.shape[0] // TABLE_FIELDS, heads)](*args, **kwargs)
    if not deterministic:
        dq = dq_buffer.to(q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops
# max_seqlen <= 0 stands for "not given" below the public API (custom op schemas take no
# Optional[int] default here, and the launchers never need it).


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: Optional[int]) -> None:
    """The checks of cu_seqlens that read its values: starts at 0, never decreases (empty
    sequences are allowed), ends at total_tokens, and no sequence is longer than max_seqlen.
    Reading a GPU tensor on the host synchronizes; see ``varlen_attention(validate=...)``."""
    values = cu_seqlens.detach().to("cpu", torch.int64)
    if values[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0].item()}")
    lengths = values[1:] - values[:-1]
    if (lengths < 0).any():
        where = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{where}] = {values[where].item()} > "
                         f"cu_seqlens[{where + 1}] = {values[where + 1].item()}")
    if values[-1].item() != total_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens q.shape[0] = {total_tokens}, "
                         f"got {values[-1].item()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_seqlen is not None and max_seqlen > 0 and longest > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest} tokens)")


@torch.library.custom_op("fastssl::varlen_attention_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, scale: float, deterministic: bool, validate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, H, D) in q's dtype, lse (H, T) float32 in log2 units of the scaled scores)."""
    if validate:
        check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    return _forward_triton(q, k, v, cu_seqlens, max_seqlen, scale)


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, deterministic, validate):
    # As _forward_triton: out, the float32 lse, and the tile table while the kernels run.
    total_tokens, heads, head_dim = q.shape
    out = q.new_empty((total_tokens, heads, head_dim))
    lse = q.new_empty((heads, total_tokens), dtype=torch.float32)
    _fake_table(q, cu_seqlens, max_seqlen, "forward")
    return out, lse


@torch.library.custom_op("fastssl::varlen_attention_bwd", mutates_args=())
def backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_triton(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, deterministic)


@backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, deterministic):
    # As _backward_triton: a contiguous copy of a grad_out strided along head_dim, the float32
    # delta, dK, dV, dQ (or its float32 atomic buffer), the tile table, and the buffer's cast.
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    total_tokens, heads, head_dim = q.shape
    delta = q.new_empty((heads, total_tokens), dtype=torch.float32)
    dk = k.new_empty((total_tokens, heads, head_dim))
    dv = v.new_empty((total_tokens, heads, head_dim))
    dq = q.new_empty((total_tokens, heads, head_dim), dtype=q.dtype if deterministic else torch.float32)
    table = _fake_table(q, cu_seqlens, max_seqlen, "backward")
    dq = dq.to(q.dtype)  # while delta and the table are alive, as in the launcher
    del delta, table
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, deterministic, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.constants = (max_seqlen, scale, deterministic)


def _backward(ctx, grad_out, unused_grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.constants)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, x, min_dim=3)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape (total_tokens, heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D (n_seqs + 1,) with n_seqs >= 1, got shape {tuple(cu_seqlens.shape)}")
    devices = {x.device for x in (q, k, v, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v and cu_seqlens must be on one device, got q: {q.device}, k: {k.device}, "
                         f"v: {v.device}, cu_seqlens: {cu_seqlens.device}")
    if max_seqlen is not None:
        check_positive_int("max_seqlen", max_seqlen)
    if scale is not None:
        check_positive_float("scale", scale)


def _why_not_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Reason:
    if q.dtype == torch.float64:
        return "the kernels compute in float32; float64 input runs on the reference backend"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"the kernels support head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))}, got {q.shape[-1]}"
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        return "the kernels need unit stride along head_dim (call .contiguous())"
    return None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: Optional[int] = None,
    scale: Optional[float] = None,
    *,
    deterministic: bool = False,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Attention of packed sequences, each to itself only (no causal mask).

    Args:
        q, k, v: (total_tokens, heads, head_dim), one dtype (float16, bfloat16, float32;
            float64 on the reference backend). Any strides with unit stride along head_dim,
            e.g. the views ``qkv.reshape(T, 3, H, D).unbind(1)`` of a fused projection.
        cu_seqlens: int32 (n_seqs + 1,) token offsets ``[0, n_1, n_1 + n_2, ..., T]`` on q's
            device. Empty sequences are allowed.
        max_seqlen: optional upper bound on the sequence lengths. The kernels never need
            it and never read cu_seqlens on the host; when given it only shrinks the grids.
            It must then be >= every length: a shorter one that would leave tiles without
            a program stops the kernels with a device-side assert (on the CPU, an error).
        scale: multiplies q.k before the softmax; default 1 / sqrt(head_dim).
        deterministic: compute dQ in a separate pass (bit-identical gradients from run to
            run) instead of float32 atomics from the dK/dV pass (faster).
        validate: check the values of cu_seqlens (starts at 0, non-decreasing, ends at
            total_tokens, within max_seqlen). Default: when cu_seqlens is on the CPU, where
            reading it costs nothing. On a GPU reading it synchronizes with the host, so
            it is off unless requested; malformed offsets then give wrong outputs but never
            an out-of-bounds access (the tile schedule clamps them), and those that would
            leave tiles unscheduled stop with the device-side assert above.
    Returns:
        (total_tokens, heads, head_dim) in q's dtype, contiguous; differentiable with respect
        to q, k and v.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if validate is None:
        validate = _checks.host_reads_are_free(cu_seqlens)
    backend = select_backend("varlen_attention", q.device, {
        "triton": lambda: _why_not_triton(q, k, v),
        "reference": lambda: None,
    })
    with record_function(ATTENTION):
        if backend == "reference":
            if validate:
                check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
            return varlen_attention_reference(q, k, v, cu_seqlens, scale)
        out, _ = _forward_op(q, k, v, cu_seqlens, max_seqlen or 0, float(scale), bool(deterministic),
                             bool(validate))
        return out


def varlen_attention_flops(lengths, heads: int, head_dim: int, backward: bool = False) -> int:
    """FlashAttention's count: forward 4 * sum(n_i^2) * heads * head_dim; backward 2.5x."""
    forward = 4 * sum(n * n for n in lengths) * heads * head_dim
    return forward + int(2.5 * forward) if backward else forward


def varlen_attention_bytes(total_tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                           backward: bool = False) -> int:
    """Minimal traffic: the forward reads Q, K, V and writes O (and the float32 lse); the
    backward reads Q, K, V, O, dO and the lse and writes dQ, dK, dV."""
    e = torch.empty((), dtype=dtype).element_size()
    tensor = total_tokens * heads * head_dim * e
    lse = total_tokens * heads * 4
    forward = 4 * tensor + lse
    return forward + (8 * tensor + 2 * lse if backward else 0)
