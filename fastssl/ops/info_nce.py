"""InfoNCE / NT-Xent without the N x N logits: Triton kernels, custom ops, functional API.

Contrastive losses (SimCLR's NT-Xent, MoCo v3, CLIP) take a softmax over the similarities of
every query row with every key row of the global batch: at SimCLR's 2N = 8192 rows that is
an 8192 x 8192 float32 matrix (256 MiB) kept for the backward, and memory caps the batch.
Here the similarities are computed tile by tile and never stored, as flash attention does
with one set of rows against another: the forward keeps an online log-sum-exp per query row
and picks out the positive's logit on the way; the backward recomputes each tile of
similarities from the rows and that log-sum-exp. Semantics: :mod:`fastssl.reference.info_nce`.

Kernels (M query rows, N keys gathered over the ranks, D features, e-byte inputs; tiles of
BLOCK_M x BLOCK_N similarities, all D features of a row at once):

- ``_info_nce_forward_kernel``: grid (M / BLOCK_M,). Streams the keys (and, for NT-Xent, the query
  view's own gathered rows, the row itself left out) past a block of queries: ``2 M N D``
  FLOPs per key set; reads the queries once and the keys once per query block (from L2 after
  the first), writes two floats per query row (log-sum-exp and the positive's logit).
- ``_info_nce_grad_rows_kernel``: the gradient of one side. For queries (grid over query blocks):
  ``sum_j (p_ij - [j positive]) k_j``; for keys or the own-view rows (grid over their blocks):
  ``sum_i (p_ij - [j positive of i]) q_i``, with ``p_ij = exp(s_ij - lse_i)``. Each recomputes
  the similarities (``2 M N D``) and multiplies (``2 M N D``): ``4 M N D`` per key set and
  side. 16-bit rows multiply on tensor cores with float32 accumulation, and the float32
  factors ``p - [positive]`` enter those products as two 16-bit halves (high and low), so
  the gradient keeps float32 resolution.

Nothing of size M x N exists in the forward or the backward: the saved tensors are the rows
and two floats per query row. Inputs are float32, bfloat16 or float16; float64 runs on the
reference backend. Distributed (keys and own-view rows gathered with gradient): each rank
gets its rows' gradients summed over the ranks, as SimCLR's gather and lightly's do.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastssl._checks import check_finite, check_float_tensor, check_positive_float
from fastssl.backend import Reason, select_backend, triton_interpreter_enabled
from fastssl.distributed import ProcessGroup, all_gather_rows, resolve_group
from fastssl.ops.launch import first_that_fits
from fastssl.ops.triton_math import mma
from fastssl.reference.info_nce import info_nce_reference

LOG2_E = 1.4426950408889634
KERNEL_LOG2_E = tl.constexpr(LOG2_E)
KERNEL_LN_2 = tl.constexpr(0.6931471805599453)
MAX_FEATURES = 256  # all of a row's features sit in one tile (SimCLR and MoCo v3 project to 128 or 256)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _similarities(rows, columns, scale2, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) similarities of two row blocks, in log2 units (times log2(e) / t)."""
    return mma(rows, tl.trans(columns), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST) * scale2


@triton.jit
def _exact_product(factors, rows, acc, UPCAST: tl.constexpr):
    """acc + factors @ rows with float32 ``factors``: as they are for float32 rows, as a high
    and a low 16-bit half (two tensor-core products) for 16-bit rows."""
    if rows.dtype == tl.float32 or UPCAST:
        return mma(factors, rows.to(tl.float32), acc, UPCAST)
    high = factors.to(rows.dtype)
    low = (factors - high.to(tl.float32)).to(rows.dtype)
    return mma(low, rows, mma(high, rows, acc, UPCAST), UPCAST)


@triton.jit
def _load_block(ptr, first, count, stride, features, D, BLOCK: tl.constexpr):
    indices = first + tl.arange(0, BLOCK)
    mask = (indices < count)[:, None] & (features < D)[None, :]
    return tl.load(ptr + indices[:, None].to(tl.int64) * stride + features[None, :], mask=mask, other=0.0), indices


@triton.jit
def _online_update(maximum, total, s):
    new_maximum = tl.maximum(maximum, tl.max(s, axis=1))
    total = total * tl.exp2(maximum - new_maximum) + tl.sum(tl.exp2(s - new_maximum[:, None]), axis=1)
    return new_maximum, total


@triton.jit
def _info_nce_forward_kernel(
    q_ptr, k_ptr, n_ptr, lse_ptr, positive_ptr,
    M, N, D, row_offset, scale2, stride_q, stride_k, stride_n,
    HAS_OWN_VIEW: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per query row of block program_id(0): the natural log-sum-exp of its similarities /
    t over the keys (and the own view's rows but itself), and its positive's similarity / t
    (the key at global row ``row_offset + i``)."""
    features = tl.arange(0, BLOCK_D)
    q, rows = _load_block(q_ptr, tl.program_id(0) * BLOCK_M, M, stride_q, features, D, BLOCK_M)
    targets = row_offset + rows
    maximum = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    positive = tl.zeros([BLOCK_M], dtype=tl.float32)
    for first in range(0, N, BLOCK_N):
        k, columns = _load_block(k_ptr, first, N, stride_k, features, D, BLOCK_N)
        s = _similarities(q, k, scale2, UPCAST, BLOCK_M, BLOCK_N)
        s = tl.where((columns < N)[None, :], s, float("-inf"))
        positive += tl.sum(tl.where(columns[None, :] == targets[:, None], s, 0.0), axis=1)
        maximum, total = _online_update(maximum, total, s)
    if HAS_OWN_VIEW:
        for first in range(0, N, BLOCK_N):
            own, columns = _load_block(n_ptr, first, N, stride_n, features, D, BLOCK_N)
            s = _similarities(q, own, scale2, UPCAST, BLOCK_M, BLOCK_N)
            s = tl.where((columns < N)[None, :] & (columns[None, :] != targets[:, None]), s, float("-inf"))
            maximum, total = _online_update(maximum, total, s)
    valid = rows < M
    tl.store(lse_ptr + rows, (maximum + tl.log2(total)) * KERNEL_LN_2, mask=valid)
    tl.store(positive_ptr + rows, positive * KERNEL_LN_2, mask=valid)


@triton.jit
def _info_nce_grad_rows_kernel(
    out_ptr, a_ptr, b_ptr, lse_ptr,
    M, N, D, row_offset, scale2, stride_a, stride_b, stride_out,
    ROWS_ARE_QUERIES: tl.constexpr, OWN_VIEW: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [program_id(0) * BLOCK_A, ...) of one side's gradient, unscaled (times
    grad / (M t) afterwards): with the factors f_ij = p_ij - [j is i's positive] (OWN_VIEW:
    p_ij, and 0 at j = i's own row),

    - ROWS_ARE_QUERIES (a = queries, b = keys or own-view rows): sum_j f_ij b_j;
    - otherwise (a = keys or own-view rows, b = queries): sum_i f_ij b_i.
    """
    features = tl.arange(0, BLOCK_D)
    a, a_index = _load_block(a_ptr, tl.program_id(0) * BLOCK_A, M if ROWS_ARE_QUERIES else N, stride_a,
                             features, D, BLOCK_A)
    acc = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    if ROWS_ARE_QUERIES:
        lse2 = tl.load(lse_ptr + a_index, mask=a_index < M, other=0.0) * KERNEL_LOG2_E
        for first in range(0, N, BLOCK_B):
            b, b_index = _load_block(b_ptr, first, N, stride_b, features, D, BLOCK_B)
            p = tl.exp2(_similarities(a, b, scale2, UPCAST, BLOCK_A, BLOCK_B) - lse2[:, None])
            hit = b_index[None, :] == (row_offset + a_index)[:, None]
            factors = tl.where((b_index < N)[None, :], p, 0.0)
            factors = tl.where(hit, 0.0, factors) if OWN_VIEW else factors - tl.where(hit, 1.0, 0.0)
            acc = _exact_product(factors, b, acc, UPCAST)
    else:
        for first in range(0, M, BLOCK_B):
            b, b_index = _load_block(b_ptr, first, M, stride_b, features, D, BLOCK_B)
            lse2 = tl.load(lse_ptr + b_index, mask=b_index < M, other=0.0) * KERNEL_LOG2_E
            # (BLOCK_A keys, BLOCK_B queries): the transposed tile, p_ij laid out as [j, i]
            p = tl.exp2(_similarities(a, b, scale2, UPCAST, BLOCK_A, BLOCK_B) - lse2[None, :])
            hit = a_index[:, None] == (row_offset + b_index)[None, :]
            factors = tl.where((b_index < M)[None, :], p, 0.0)
            factors = tl.where(hit, 0.0, factors) if OWN_VIEW else factors - tl.where(hit, 1.0, 0.0)
            acc = _exact_product(factors, b, acc, UPCAST)
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask = (rows < (M if ROWS_ARE_QUERIES else N))[:, None] & (features < D)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + features[None, :], acc, mask=mask)


# ----------------------------------------------------------------------------- launchers


def launch_shape(D: int) -> dict:
    """Features and warps: all D features of a row in one tile, 8 warps from D = 256 (fewer
    registers per thread for the row tiles)."""
    block_d = max(16, triton.next_power_of_2(D))
    return dict(BLOCK_D=block_d, num_warps=8 if block_d >= 256 else 4)


def row_blocks(D: int, dtype: torch.dtype, gradient: bool) -> list[int]:
    """Rows per tile, the candidates best first (:func:`fastssl.ops.launch.first_that_fits`
    takes the first that fits the device without spilling). 16-bit: 64, and 32 in the
    gradient kernels from D = 256, whose (rows, D) float32 accumulator would otherwise spill
    registers on sm_90. float32 rows take twice the registers of 16-bit ones and multiply
    without wgmma: half those tiles, and from D = 256 in the forward too. Then halved down to
    16 rows, tl.dot's smallest, for GPUs with less shared memory or fewer registers to spare
    (tests/compile_kernels.py compiles every target's choice)."""
    block = 32 if (gradient or dtype == torch.float32) and D > 128 else 64
    block = block // 2 if dtype == torch.float32 else block
    return [block >> shift for shift in range(3) if block >> shift >= 16]


def _launch_rows(kernel, key, n_rows: int, args: tuple, blocks: list[int], block_names: tuple, device, **kwargs):
    """Launch ``kernel`` over ``n_rows`` in tiles of the first of ``blocks`` that fits."""
    def launch_options(block):
        return dict(kwargs, **{name: block for name in block_names})

    block = first_that_fits(key, device, blocks, lambda block: [(kernel, args, launch_options(block))])
    kernel[(triton.cdiv(n_rows, block),)](*args, **launch_options(block))


def _forward_triton(query, keys, own_view, temperature: float, row_offset: int, launch: bool = True):
    """(lse, positive logit) per query row; ``launch=False`` (the fake): allocations only."""
    M, D = query.shape
    N = keys.shape[0]
    lse = torch.empty(M, dtype=torch.float32, device=query.device)
    positive = torch.empty_like(lse)
    if not launch:
        return lse, positive
    args = (query, keys, keys if own_view is None else own_view, lse, positive,
            M, N, D, row_offset, LOG2_E / temperature, query.stride(0), keys.stride(0),
            keys.stride(0) if own_view is None else own_view.stride(0))
    _launch_rows(_info_nce_forward_kernel, ("info_nce forward", query.dtype, D, own_view is not None), M, args,
                 row_blocks(D, query.dtype, gradient=False), ("BLOCK_M", "BLOCK_N"), query.device,
                 HAS_OWN_VIEW=own_view is not None, **launch_shape(D), UPCAST=triton_interpreter_enabled())
    return lse, positive


def _grad_rows(rows, other, lse, M, N, temperature, row_offset, rows_are_queries: bool, own_view: bool,
               launch: bool):
    D = rows.shape[1]
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    if not launch:
        return out
    args = (out, rows, other, lse, M, N, D, row_offset, LOG2_E / temperature, rows.stride(0), other.stride(0),
            out.stride(0))
    _launch_rows(_info_nce_grad_rows_kernel, ("info_nce gradient", rows.dtype, D, rows_are_queries, own_view),
                 rows.shape[0], args, row_blocks(D, rows.dtype, gradient=True), ("BLOCK_A", "BLOCK_B"), rows.device,
                 ROWS_ARE_QUERIES=rows_are_queries, OWN_VIEW=own_view, **launch_shape(D),
                 UPCAST=triton_interpreter_enabled())
    return out


def _backward_triton(grad_loss, query, keys, own_view, lse, temperature: float, row_offset: int,
                     need_keys: bool, need_own_view: bool, launch: bool = True):
    """The rows' gradients; ``launch=False`` (the fake): the same allocations, no kernel."""
    M, N = query.shape[0], keys.shape[0]
    scale = grad_loss.float() / (M * temperature)

    def grad_rows(rows, other, rows_are_queries: bool, own: bool):
        return _grad_rows(rows, other, lse, M, N, temperature, row_offset, rows_are_queries, own, launch)

    grad_query = grad_rows(query, keys, True, False)
    if own_view is not None:
        grad_query += grad_rows(query, own_view, True, True)
    grad_keys = grad_rows(keys, query, False, False) if need_keys else None
    grad_own = grad_rows(own_view, query, False, True) if need_own_view else None
    return tuple(None if g is None else (g * scale).to(like.dtype)
                 for g, like in ((grad_query, query), (grad_keys, keys), (grad_own, own_view)))


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastssl::info_nce_fwd", mutates_args=())
def _info_nce_op(query: torch.Tensor, keys: torch.Tensor, own_view: Optional[torch.Tensor], temperature: float,
                 row_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    lse, positive = _forward_triton(query, keys, own_view, temperature, row_offset)
    return (lse - positive).mean(), lse


@_info_nce_op.register_fake
def _(query, keys, own_view, temperature, row_offset):
    # The launcher's float32 lse and positive logit per query row, and the loss's temporaries.
    lse, positive = _forward_triton(query, keys, own_view, temperature, row_offset, launch=False)
    return (lse - positive).mean(), lse


@torch.library.custom_op("fastssl::info_nce_bwd", mutates_args=())
def _info_nce_backward_op(grad_loss: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                          own_view: Optional[torch.Tensor], lse: torch.Tensor, temperature: float, row_offset: int,
                          need_keys: bool, need_own_view: bool) -> list[torch.Tensor]:
    """[grad query] + [grad keys if need_keys] + [grad own-view rows if need_own_view]."""
    grads = _backward_triton(grad_loss, query, keys, own_view, lse, temperature, row_offset, need_keys,
                             need_own_view)
    return [grad for grad in grads if grad is not None]


@_info_nce_backward_op.register_fake
def _(grad_loss, query, keys, own_view, lse, temperature, row_offset, need_keys, need_own_view):
    # The launcher without its kernels: a float32 gradient per side (and one more for the
    # own-view term of the queries), each scaled and cast to its rows' dtype.
    grads = _backward_triton(grad_loss, query, keys, own_view, lse, temperature, row_offset, need_keys,
                             need_own_view, launch=False)
    return [grad for grad in grads if grad is not None]


def _setup_context(ctx, inputs, output):
    query, keys, own_view, temperature, row_offset = inputs
    ctx.save_for_backward(query, keys, own_view, output[1])
    ctx.constants = (temperature, row_offset)
    ctx.needs = (keys.requires_grad, own_view is not None and own_view.requires_grad)


def _backward(ctx, grad_loss, _grad_lse):
    query, keys, own_view, lse = ctx.saved_tensors
    grads = iter(_info_nce_backward_op(grad_loss, query, keys, own_view, lse, *ctx.constants, *ctx.needs))
    need_keys, need_own_view = ctx.needs
    return (next(grads), next(grads) if need_keys else None, next(grads) if need_own_view else None, None, None)


_info_nce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def _why_not_triton(query: torch.Tensor) -> Reason:
    if query.dtype == torch.float64:
        return "the kernels compute in float32; float64 input runs on the reference backend"
    if query.shape[1] > MAX_FEATURES:
        return f"the kernels hold a row's features in one tile: D <= {MAX_FEATURES}, got {query.shape[1]}"
    return None


def _check_inputs(query, key, temperature, positives) -> float:
    check_float_tensor("query", query, min_dim=2)
    check_float_tensor("key", key, min_dim=2)
    if query.dim() != 2 or key.shape != query.shape:
        raise ValueError(f"query and key must be (N, D) of one shape, got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if key.device != query.device:
        raise ValueError(f"query and key must share one device, got {query.device} and {key.device}")
    if positives != "diagonal":
        raise ValueError(f"positives must be 'diagonal' (query row i's positive is key row i), got {positives!r}")
    check_finite("query", query)
    check_finite("key", key)
    return check_positive_float("temperature", temperature)


def _one_direction(query, keys, own_view, temperature, row_offset, backend):
    if backend == "reference":
        return info_nce_reference(query, keys, own_view, temperature, row_offset)
    contiguous = [None if t is None else (t if t.stride(-1) == 1 else t.contiguous()) for t in (query, keys, own_view)]
    return _info_nce_op(*contiguous, temperature, row_offset)[0]


def info_nce(
    query: torch.Tensor, key: torch.Tensor, temperature: float, *, positives: str = "diagonal",
    symmetric: bool = False, exclude_self: bool = False, group: ProcessGroup = None,
) -> torch.Tensor:
    """Contrastive cross-entropy of query rows against the key rows of the whole batch.

    Args:
        query, key: (N, D) rows of this rank, any float dtype (16-bit: tensor-core products,
            float32 accumulation); query row i's positive is key row i of the same rank
            (``positives="diagonal"``). Not normalized here: pass l2-normalized rows for
            cosine similarities.
        temperature: t > 0; logits are ``query @ key_all.T / t``.
        symmetric: average with the same loss of the keys against the queries (CLIP).
        exclude_self: NT-Xent (SimCLR): the query view's own rows of the whole batch are
            negatives too, all but the row itself, so each row's denominator has 2 N_global - 1
            terms; with ``symmetric``, the loss averages SimCLR's 2 N rows.
        group: process group the batch is split over (default: the default group when
            torch.distributed is initialized); keys (and own-view rows) are all-gathered with
            gradient, so each rank gets its rows' gradients summed over the ranks.
    Returns:
        The scalar float32 (float64 for float64 rows) mean over this rank's query rows (of
        both directions with ``symmetric``).
    """
    temperature = _check_inputs(query, key, temperature, positives)
    group = resolve_group(group)
    row_offset = 0 if group is None else torch.distributed.get_rank(group) * query.shape[0]
    backend = select_backend("info_nce", query.device, {
        "triton": lambda: _why_not_triton(query),
        "reference": lambda: None,
    })
    keys, queries = all_gather_rows(key, group), all_gather_rows(query, group) if exclude_self or symmetric else None
    loss = _one_direction(query, keys, queries if exclude_self else None, temperature, row_offset, backend)
    if symmetric:
        loss = (loss + _one_direction(key, queries, keys if exclude_self else None, temperature, row_offset,
                                      backend)) / 2
    return loss


def info_nce_bytes(M: int, N: int, D: int, dtype: torch.dtype, key_sets: int = 1,
                   key_gradients: bool = True) -> int:
    """Minimal traffic of one forward + backward: the rows read once per pass (forward, query
    gradient and, unless the keys take no gradient (MoCo's momentum keys), key gradients) and
    the gradients written once. Used by the benchmarks."""
    element = torch.empty((), dtype=dtype).element_size()
    queries, keys = M * D * element, key_sets * N * D * element
    if not key_gradients:
        return 2 * (queries + keys) + queries
    return 3 * (queries + keys) + queries + keys


def info_nce_flops(M: int, N: int, D: int, key_sets: int = 1, key_gradients: bool = True) -> int:
    """Per key set: 2 M N D forward; backward, 4 M N D for the query side (recomputed
    similarities and the product) and as much again for the key side when keys take gradients."""
    return (10 if key_gradients else 6) * M * N * D * key_sets

