"""Barlow Twins loss without a D x D buffer when N < D, autograd-correct across ranks.

With z1n, z2n the batch-standardized embeddings (N, D) (statistics over the global batch,
biased variance, as BatchNorm1d(affine=False) under SyncBatchNorm) and C = z1n.T z2n / N:

    L = sum_i (1 - C_ii)^2 + lambd * (sum_ij C_ij^2 - sum_i C_ii^2)
    sum_ij C_ij^2 = <G1, G2>_F / N^2,   G1 = z1n z1n.T,  G2 = z2n z2n.T   (N x N)
    C_ii = sum_b z1n[b, i] z2n[b, i] / N

and, with d_i = -2 (1 - C_ii) - 2 lambd C_ii,

    dL/dz1n = (2 lambd / N^2) G2 z1n + z2n * d / N    (Gram form, O(N^2 D))
            = (2 lambd / N) z2n C.T  + z2n * d / N    (C form, O(N D^2))

The Gram form is used when N < D (never allocating D x D), the C form otherwise. Four
Triton kernels do the forward and the elementwise backward; the backward's two matmuls
(G2 z1n and G1 z2n, or z2n C.T and z1n C) run on cuBLAS, with 16-bit operands and float32
results. G's entries are squared row norms, about D for standardized rows (8192 in the
recipe), so one sample at 3x the others' norm takes them past float16's 65504: the float32
matrix is scaled by a power of two before its cast (:func:`matmul_operand`), and the
kernel takes the scale back out in float32, exactly.

- ``_standardize_pair_kernel``: z1n, z2n (float32) from the column statistics, and the
  column sums of z1n * z2n (N * C_ii). Reads 2 N D e bytes (e: bytes per input element),
  writes 8 N D. The matmuls take z1n, z2n cast to the inputs' dtype (tensor cores, like
  the official loss under autocast); the diagonal and the backward use the float32 values.
- ``_gram_pair_kernel``: 64 x 64 tiles of G1 and G2 at once (two accumulators, K tiles of
  32, 8 warps), written out for the backward, with <G1, G2>_F summed per tile in the
  epilogue. In one process G is symmetric, so only tiles on or above the diagonal are
  computed (and stored twice): 2 N^2 D FLOPs for both Gram matrices instead of 4 N^2 D.
  ``matmul="cublas"`` computes G1 and G2 with torch matmuls instead (all tiles, 4 N^2 D
  FLOPs, on cuBLAS's tuned GEMMs); which is faster is a GPU measurement
  (benchmarks/bench_barlow_twins.py).
- ``_cross_correlation_kernel``: tiles of C = z1n.T z2n / N (128 x 128 in float32, 64 x 64
  for 16-bit inputs), reducing the squared off-diagonal entries in the epilogue (no second
  pass over C); 2 N D^2 FLOPs. C is kept for the backward (N >= D, so it is no larger than
  the inputs).
- ``_standardize_backward_kernel``: forms dzn = alpha * gram_term + other * d / N on the fly
  and applies the standardization's backward,
  dz = rstd * (dzn - mean_b(dzn) - zn * mean_b(dzn * zn)); the two means come from the
  same kernel run in its ``SUMS`` mode first. Each mode reads 3 N D e bytes.

Distributed (the batch split over ranks): statistics and C_ii are all-reduced as D-vectors.
Gram form: each rank all-gathers z1n and z2n (2 N_global D e bytes received) and computes
its own rows of G1, G2 and of the gradient; C form: C is all-reduced (D^2 floats). Every
rank returns the global loss, and its gradients are scaled by the world size so that DDP's
average over ranks yields the gradient of that loss (the official code's all-reduce of C
is not autograd-aware and gives gradients 1/world_size too small).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from fastssl._checks import check_finite, check_float_tensor, check_positive_float
from fastssl.backend import select_backend, triton_interpreter_enabled
from fastssl.distributed import ProcessGroup, gather_rows, resolve_group
from fastssl.ops.dino_loss import kernel_dtype_reason
from fastssl.ops.launch import first_that_fits, has_data
from fastssl.ops.triton_math import mma, programs_per_wave
from fastssl.reference.barlow_twins import barlow_twins_loss_original

BLOCK_N, BLOCK_D = 32, 128  # standardization kernels
# The matmul kernels' tiles: (square output tile, K tile, warps), chosen so that no 16-bit
# configuration spills registers on the targets tests/compile_kernels.py checks. The Gram
# kernel keeps two accumulators (G1, G2) and a transposed store: 8 warps, K tiles of 32, or
# of 16 (half the operand registers) where the compiler spills those (Triton 3.4's FMA dots
# on sm_75): candidates, best first, for fastssl.ops.launch.first_that_fits. The
# cross-correlation's reduction epilogue spills a 128 x 128 tile on sm_90 with 8 warps and
# on sm_80 with 16, so 16-bit inputs take 64 x 64 tiles.
GRAM_TILES = ((64, 32, 8), (64, 16, 8))
CROSS_TILES = {torch.float32: (128, 32, 8), "16-bit": (64, 64, 4)}


@triton.jit
def _standardize_pair_kernel(
    z1_ptr, z2_ptr, mean1_ptr, rstd1_ptr, mean2_ptr, rstd2_ptr, out1_ptr, out2_ptr, diag_ptr,
    N, D, rows_per_split, stride1, stride2,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Columns of program_id(0), rows of split program_id(1): write z1n, z2n in float32 and
    diag[split, col] = sum over the split's rows of z1n * z2n."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mean1 = tl.load(mean1_ptr + cols, mask=col_mask, other=0.0)
    rstd1 = tl.load(rstd1_ptr + cols, mask=col_mask, other=0.0)
    mean2 = tl.load(mean2_ptr + cols, mask=col_mask, other=0.0)
    rstd2 = tl.load(rstd2_ptr + cols, mask=col_mask, other=0.0)
    diag = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for r0 in range(start, end, BLOCK_N):
        rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < end)[:, None] & col_mask[None, :]
        a = tl.load(z1_ptr + rows[:, None] * stride1 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(z2_ptr + rows[:, None] * stride2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = (a - mean1[None, :]) * rstd1[None, :]
        b = (b - mean2[None, :]) * rstd2[None, :]
        tl.store(out1_ptr + rows[:, None] * D + cols[None, :], a, mask=mask)
        tl.store(out2_ptr + rows[:, None] * D + cols[None, :], b, mask=mask)
        diag += tl.sum(tl.where(mask, a * b, 0.0), axis=0)
    tl.store(diag_ptr + tl.program_id(1) * D + cols, diag, mask=col_mask)


@triton.jit
def _standardize_backward_kernel(
    gram_ptr, other_ptr, zn_ptr, d_ptr, rstd_ptr, alpha_ptr, sums_ptr, grad_loss_ptr, out_ptr,
    N, D, rows_per_split, inv_n, world,
    SUMS: tl.constexpr, CENTER_ONLY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dzn = alpha * gram + other * d / N, formed on the fly (all (N, D) contiguous; alpha a
    one-element tensor, as it carries the operand scale of :func:`matmul_operand`).

    SUMS: sums[split, 0 | 1, col] = column sums of dzn | dzn * zn over the split's rows.
    Otherwise: out = grad_loss * world * rstd * (dzn - sums[0] / N_global - zn * sums[1] / N_global),
    or with CENTER_ONLY (zn = z - mean, no scaling) out = grad_loss * world * (dzn - sums[0] / N_global),
    with ``sums`` (2, D) already reduced over splits and ranks (inv_n = 1 / N_global).
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    d = tl.load(d_ptr + cols, mask=col_mask, other=0.0)
    alpha = tl.load(alpha_ptr)
    if SUMS:
        sum_dzn = tl.zeros([BLOCK_D], dtype=tl.float32)
        sum_dzn_zn = tl.zeros([BLOCK_D], dtype=tl.float32)
    else:
        scale = tl.load(grad_loss_ptr) * world
        if not CENTER_ONLY:
            scale = tl.load(rstd_ptr + cols, mask=col_mask, other=0.0) * scale
        mean_dzn = tl.load(sums_ptr + cols, mask=col_mask, other=0.0) * inv_n
        mean_dzn_zn = tl.load(sums_ptr + D + cols, mask=col_mask, other=0.0) * inv_n
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for r0 in range(start, end, BLOCK_N):
        rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < end)[:, None] & col_mask[None, :]
        offsets = rows[:, None] * D + cols[None, :]
        gram = tl.load(gram_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        other = tl.load(other_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        zn = tl.load(zn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dzn = alpha * gram + other * (d * inv_n)[None, :]
        if SUMS:
            sum_dzn += tl.sum(dzn, axis=0)
            sum_dzn_zn += tl.sum(dzn * zn, axis=0)
        else:
            dz = dzn - mean_dzn[None, :]
            if not CENTER_ONLY:
                dz -= zn * mean_dzn_zn[None, :]
            dz *= scale
            tl.store(out_ptr + offsets, dz.to(out_ptr.dtype.element_ty), mask=mask)
    if SUMS:
        tl.store(sums_ptr + (tl.program_id(1) * 2) * D + cols, sum_dzn, mask=col_mask)
        tl.store(sums_ptr + (tl.program_id(1) * 2 + 1) * D + cols, sum_dzn_zn, mask=col_mask)


@triton.jit
def _gram_pair_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, g1_ptr, g2_ptr, partial_ptr, M, N, D,
    SYMMETRIC: tl.constexpr, ONE_VIEW: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile (program_id(0), program_id(1)) of G1 = a1 b1.T and G2 = a2 b2.T ((M, N), float32
    accumulation; a* (M, D) and b* (N, D) contiguous), written out for the backward, and
    partial[tile] = sum of G1 * G2 over the tile (ONE_VIEW: G2 is G1, a2/b2/g2 unused).

    SYMMETRIC (a is b, M == N): tiles below the diagonal are skipped; a tile above it is
    also written transposed and counts twice, which halves the multiply-adds.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    tile = pid_m * tl.num_programs(1) + pid_n
    if SYMMETRIC and pid_n < pid_m:
        tl.store(partial_ptr + tile, 0.0)
        return
    rows = (pid_m * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    acc1 = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_mask = (rows < M)[:, None] & (ks < D)[None, :]
        b_mask = (cols < N)[:, None] & (ks < D)[None, :]
        a_offsets = rows[:, None] * D + ks[None, :]
        b_offsets = cols[:, None] * D + ks[None, :]
        a = tl.load(a1_ptr + a_offsets, mask=a_mask, other=0.0)
        b = tl.load(b1_ptr + b_offsets, mask=b_mask, other=0.0)
        acc1 = mma(a, tl.trans(b), acc1, UPCAST)
        if not ONE_VIEW:
            a = tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0)
            b = tl.load(b2_ptr + b_offsets, mask=b_mask, other=0.0)
            acc2 = mma(a, tl.trans(b), acc2, UPCAST)
    if ONE_VIEW:
        acc2 = acc1
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    weight = 2.0 if SYMMETRIC and pid_n > pid_m else 1.0
    tl.store(partial_ptr + tile, weight * tl.sum(tl.where(mask, acc1 * acc2, 0.0)))
    tl.store(g1_ptr + rows[:, None] * N + cols[None, :], acc1, mask=mask)
    if not ONE_VIEW:
        tl.store(g2_ptr + rows[:, None] * N + cols[None, :], acc2, mask=mask)
    if SYMMETRIC and pid_n > pid_m:
        tl.store(g1_ptr + cols[None, :] * N + rows[:, None], acc1, mask=mask)
        if not ONE_VIEW:
            tl.store(g2_ptr + cols[None, :] * N + rows[:, None], acc2, mask=mask)


@triton.jit
def _cross_correlation_kernel(
    a_ptr, b_ptr, c_ptr, partial_ptr, N, D, scale,
    REDUCE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile (program_id(0), program_id(1)) of C = scale * a.T b ((D, D), float32; a, b (N, D)
    contiguous), and with REDUCE, in the epilogue, partial[tile] = the sum of C_ij^2 over
    the tile's off-diagonal entries: the loss needs no second pass over C."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(a_ptr + ks[:, None] * D + rows[None, :], mask=(ks < N)[:, None] & (rows < D)[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * D + cols[None, :], mask=(ks < N)[:, None] & (cols < D)[None, :], other=0.0)
        acc = mma(tl.trans(a), b, acc, UPCAST)
    c = acc * scale
    mask = (rows < D)[:, None] & (cols < D)[None, :]
    tl.store(c_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], c, mask=mask)
    if REDUCE:
        off_diagonal = mask & (rows[:, None] != cols[None, :])
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.where(off_diagonal, c * c, 0.0)))


def _row_splits(N: int, D: int, device: torch.device):
    """Rows per program so that the (D blocks x splits) grid fills the device."""
    target = programs_per_wave(device, elsewhere=4)
    splits = max(1, min(triton.cdiv(N, BLOCK_N), triton.cdiv(target, triton.cdiv(D, BLOCK_D))))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(N, rows_per_split), rows_per_split


def _matmul_options() -> dict:
    return dict(UPCAST=triton_interpreter_enabled(), num_stages=3)


MATMULS = ("triton", "cublas")


def check_matmul(matmul) -> str:
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {', '.join(MATMULS)}, got {matmul!r}")
    return matmul


def gram_pair(a1, b1, a2=None, b2=None, symmetric=False, matmul="triton"):
    """G1 = a1 b1.T, G2 = a2 b2.T (float32 (M, N)) and <G1, G2>_F; without a2, b2 only G1
    and ||G1||_F^2. ``symmetric``: a1 is b1 and a2 is b2 (one process).

    ``matmul="triton"``: one kernel computes both products and the Frobenius product in its
    epilogue (and, symmetric, only the tiles on or above the diagonal). ``"cublas"``: two
    torch matmuls with float32 output, then the product: cuBLAS's tuned GEMMs, at the cost
    of reading G1 and G2 once more."""
    if matmul == "cublas":
        g1 = float32_matmul(a1, b1.t())
        g2 = None if a2 is None else float32_matmul(a2, b2.t())
        return g1, g2, (g1 * (g1 if g2 is None else g2)).sum()
    M, N = a1.shape[0], b1.shape[0]
    g1 = torch.empty((M, N), dtype=torch.float32, device=a1.device)
    g2 = None if a2 is None else torch.empty_like(g1)

    def grid(tile):
        return triton.cdiv(M, tile[0]), triton.cdiv(N, tile[0])

    def launch(tile, partial):
        block, block_k, warps = tile
        return _gram_pair_kernel, (
            a1, b1, a1 if a2 is None else a2, b1 if b2 is None else b2, g1, g1 if g2 is None else g2, partial,
            M, N, a1.shape[1]), dict(SYMMETRIC=symmetric, ONE_VIEW=a2 is None, BLOCK=block, BLOCK_K=block_k,
                                     num_warps=warps, **_matmul_options())

    if not has_data(a1):  # every candidate tile is 64 square: the same partials
        partial = torch.empty(math.prod(grid(GRAM_TILES[0])), dtype=torch.float32, device=a1.device)
        return g1, g2, partial.sum()
    tile = first_that_fits(("gram_pair", a1.dtype, symmetric, a2 is None), a1.device, GRAM_TILES,
                           lambda tile: [launch(tile, g1)])
    partial = torch.empty(math.prod(grid(tile)), dtype=torch.float32, device=a1.device)
    kernel, args, kwargs = launch(tile, partial)
    kernel[grid(tile)](*args, **kwargs)
    return g1, g2, partial.sum()


def float32_matmul(a, b):
    """a @ b in float32: 16-bit operands multiply on tensor cores with float32 accumulation
    and output (torch.mm's out_dtype on CUDA; exact float32 copies elsewhere, which give the
    same exact products)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


SCALED_LARGEST = 2.0**14  # float16's largest finite value is 65504, just under 2^16


def matmul_operand(matrix: torch.Tensor, dtype: torch.dtype, largest):
    """``matrix`` (float32) as a ``dtype`` matmul operand, and the factor s it was scaled by.

    16-bit: s is the power of two that brings ``largest`` (a bound on |matrix|: a float, or
    a 0-dim tensor computed on the device) to within (2^13, 2^14], so the cast cannot
    overflow float16 and the entries stay far from its subnormals; a power of two scales
    exactly, so s * matrix rounds as matrix would. float32: matrix itself, s = 1."""
    if dtype == torch.float32:
        return matrix, 1.0
    if isinstance(largest, torch.Tensor):
        exponent = torch.ceil(torch.log2(largest.float().clamp_min(2.0**-100)))
        scale = torch.exp2(math.log2(SCALED_LARGEST) - exponent)
    else:
        scale = SCALED_LARGEST / 2.0 ** math.ceil(math.log2(max(largest, 2.0**-100)))
    return (matrix * scale).to(dtype), scale


def cross_correlation(a, b, scale, reduce):
    """C = scale * a.T b (float32 (D, D)) and, with ``reduce``, the sum of its squared
    off-diagonal entries from the kernel's epilogue (else None)."""
    D = a.shape[1]
    block, block_k, warps = CROSS_TILES[torch.float32 if a.dtype == torch.float32 else "16-bit"]
    grid = (triton.cdiv(D, block), triton.cdiv(D, block))
    c = torch.empty((D, D), dtype=torch.float32, device=a.device)
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=a.device)
    if has_data(a):
        _cross_correlation_kernel[grid](a, b, c, partial, a.shape[0], D, scale, REDUCE=reduce, BLOCK=block,
                                        BLOCK_K=block_k, num_warps=warps, **_matmul_options())
    return c, partial.sum() if reduce else None


def all_reduce(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def global_mean_var(z: torch.Tensor, group: ProcessGroup, n_global: int):
    """Column mean and biased variance over the global batch, in float32 (two all-reduces
    of D floats when distributed: the sum, then the squared deviations)."""
    z = z.float()
    if group is None:
        var, mean = torch.var_mean(z, dim=0, unbiased=False)
    else:
        mean = all_reduce(z.sum(0), group) / n_global
        var = all_reduce((z - mean).square().sum(0), group) / n_global
    return mean, var


def raise_if_not_finite(**column_statistics: torch.Tensor) -> None:
    """A NaN or infinity anywhere in a column makes its statistic non-finite: one check on
    (D,) vectors (and one synchronization) covers the whole input, before any matmul."""
    for name, statistic in column_statistics.items():
        check_finite(name, statistic)


def standardize_pair(z1, z2, mean1, rstd1, mean2, rstd2):
    N, D = z1.shape
    splits, rows_per_split = _row_splits(N, D, z1.device)
    z1n = torch.empty((N, D), dtype=torch.float32, device=z1.device)
    z2n = torch.empty((N, D), dtype=torch.float32, device=z2.device)
    diag = torch.empty((splits, D), dtype=torch.float32, device=z1.device)
    if has_data(z1):
        _standardize_pair_kernel[(triton.cdiv(D, BLOCK_D), splits)](
            z1, z2, mean1, rstd1, mean2, rstd2, z1n, z2n, diag, N, D, rows_per_split,
            z1.stride(0), z2.stride(0), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )
    return z1n, z2n, diag.sum(0)


def standardize_backward(gram, other, zn, d, rstd, alpha, n_global, grad_loss, world, group, out_dtype):
    """dL/dz for dL/dzn = alpha * gram + other * d / n_global, through the standardization
    zn = (z - mean) * rstd, or through the centering zn = z - mean when ``rstd`` is None.
    ``alpha``: a float, or a 0-dim tensor on zn's device."""
    N, D = zn.shape
    splits, rows_per_split = _row_splits(N, D, zn.device)
    grid = (triton.cdiv(D, BLOCK_D), splits)
    sums = torch.empty((splits, 2, D), dtype=torch.float32, device=zn.device)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.float().reshape(1)
    else:  # a fill, not a copy from the host
        alpha = torch.full((1,), alpha, dtype=torch.float32, device=zn.device)
    common = dict(CENTER_ONLY=rstd is None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    if has_data(zn):
        _standardize_backward_kernel[grid](gram, other, zn, d, rstd, alpha, sums, grad_loss, None, N, D,
                                           rows_per_split, 1.0 / n_global, float(world), SUMS=True, **common)
    sums = all_reduce(sums.sum(0), group)
    dz = torch.empty((N, D), dtype=out_dtype, device=zn.device)
    if has_data(zn):
        _standardize_backward_kernel[grid](gram, other, zn, d, rstd, alpha, sums, grad_loss, dz, N, D,
                                           rows_per_split, 1.0 / n_global, float(world), SUMS=False, **common)
    return dz


class _BarlowTwins(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, lambd, eps, group, gram_form, matmul):
        world = 1 if group is None else dist.get_world_size(group)
        n_global = z1.shape[0] * world
        (mean1, var1), (mean2, var2) = global_mean_var(z1, group, n_global), global_mean_var(z2, group, n_global)
        rstd1, rstd2 = torch.rsqrt(var1 + eps), torch.rsqrt(var2 + eps)
        raise_if_not_finite(z1=mean1 + rstd1, z2=mean2 + rstd2)
        z1n, z2n, diag_sum = standardize_pair(z1, z2, mean1, rstd1, mean2, rstd2)
        c_diag = all_reduce(diag_sum, group) / n_global
        # Matmul operands in the inputs' dtype (torch's cast rounds to nearest even). The
        # diagonal removed from sum_ij C_ij^2 must come from the same rounded operands, so
        # that the difference is exactly the off-diagonal part of the C the matmuls see.
        mm1, mm2 = z1n.to(z1.dtype), z2n.to(z2.dtype)
        if gram_form:
            mm_diag = c_diag
            if mm1.dtype != torch.float32 or mm2.dtype != torch.float32:
                mm_diag = all_reduce((mm1.float() * mm2.float()).sum(0), group) / n_global
            all1, all2 = gather_rows(mm1, group), gather_rows(mm2, group)
            g1_rows, g2_rows, frobenius = gram_pair(mm1, all1, mm2, all2, symmetric=group is None,
                                                    matmul=matmul)  # this rank's rows
            off_diagonal = all_reduce(frobenius, group) / n_global**2 - mm_diag.square().sum()
            saved = (g1_rows, g2_rows, all1, all2)
        else:
            # One process: the off-diagonal sum comes from the matmul's epilogue. Distributed:
            # C is a sum over ranks, so it is reduced after the all-reduce.
            c, off_diagonal = cross_correlation(mm1, mm2, 1.0 / n_global, reduce=group is None)
            mm_diag = torch.diagonal(all_reduce(c, group))
            if off_diagonal is None:
                off_diagonal = c.square().sum() - mm_diag.square().sum()
            saved = (c, mm1, mm2)
        loss = (1 - c_diag).square().sum() + lambd * off_diagonal

        ctx.save_for_backward(z1n, z2n, rstd1, rstd2, c_diag, mm_diag, *saved)
        ctx.constants = (lambd, group, gram_form, n_global, world, z1.dtype, z2.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z1n, z2n, rstd1, rstd2, c_diag, mm_diag, *saved = ctx.saved_tensors
        lambd, group, gram_form, n_global, world, dtype1, dtype2 = ctx.constants
        d = (-2 * (1 - c_diag) - 2 * lambd * mm_diag).contiguous()
        # The gradient matmuls take operands in the inputs' dtype (tensor cores), like the
        # official loss's backward under autocast, which casts dL/dC to bfloat16; their
        # float32 matrices enter scaled into float16's range (see matmul_operand).
        if gram_form:
            g1_rows, g2_rows, all1, all2 = saved
            # |G| <= trace(G) = sum_b ||z_b||^2 <= N D: every standardized column has norm^2 <= N.
            largest = n_global * z1n.shape[1]
            (g2, scale1), (g1, scale2) = (matmul_operand(g2_rows, all1.dtype, largest),
                                          matmul_operand(g1_rows, all2.dtype, largest))
            gram1, gram2 = float32_matmul(g2, all1), float32_matmul(g1, all2)
            alpha = 2 * lambd / n_global**2
        else:
            c, mm1, mm2 = saved
            # |C_ij| <= 1: a correlation of standardized columns.
            (c1, scale1), (c2, scale2) = matmul_operand(c.t(), mm2.dtype, 1.0), matmul_operand(c, mm1.dtype, 1.0)
            gram1, gram2 = float32_matmul(mm2, c1), float32_matmul(mm1, c2)
            alpha = 2 * lambd / n_global
        # DDP averages gradients over ranks and every rank's loss is the global one, so each
        # rank's gradients are scaled by the world size.
        grad_loss = grad_loss.float().reshape(1).contiguous()
        dz1 = standardize_backward(gram1.contiguous(), z2n, z1n, d, rstd1, alpha / scale1, n_global, grad_loss,
                                    world, group, dtype1)
        dz2 = standardize_backward(gram2.contiguous(), z1n, z2n, d, rstd2, alpha / scale2, n_global, grad_loss,
                                    world, group, dtype2)
        return dz1, dz2, None, None, None, None, None


def check_view_pair(z1, z2, group, formulation, names=("z1", "z2")):
    """Checks shared by the two-view losses. Returns (group or None, N_global, gram_form)."""
    first, second = names
    check_float_tensor(first, z1, min_dim=2)
    check_float_tensor(second, z2, min_dim=2)
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"{first} and {second} must be (N, D) of one shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.device != z2.device:
        raise ValueError(f"{first} and {second} must share one device, got {z1.device} and {z2.device}")
    if formulation not in ("auto", "gram", "cross"):
        raise ValueError(f"formulation must be 'auto', 'gram' or 'cross', got {formulation!r}")
    group = resolve_group(group)
    n_global = z1.shape[0] * (1 if group is None else dist.get_world_size(group))
    if n_global < 2:
        raise ValueError(f"the global batch must hold at least 2 samples, got {n_global}")
    return group, n_global, formulation == "gram" or (formulation == "auto" and n_global < z1.shape[1])


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5,
    group: ProcessGroup = None, formulation: str = "auto", matmul: str = "triton",
) -> torch.Tensor:
    """The Barlow Twins loss of two (N, D) embedding batches (facebookresearch/barlowtwins).

    Args:
        z1, z2: (N_local, D) projector outputs of the two views; any float dtype (matmuls in
            it, statistics and reductions in float32).
        lambd: weight of the off-diagonal term (0.0051); eps: BatchNorm's eps (1e-5).
        group: process group the batch is split over (default: the default group when
            torch.distributed is initialized); standardization and C use the global batch.
        formulation: "gram" (N x N Gram matrices, no D x D buffer), "cross" (the D x D
            cross-correlation), or "auto": "gram" when N_global < D.
        matmul: the Gram form's forward matmuls on the triton backend: "triton" (one kernel
            with the Frobenius product in its epilogue) or "cublas" (torch matmuls).
    Returns:
        The scalar float32 loss, the same on every rank.
    """
    group, _, gram_form = check_view_pair(z1, z2, group, formulation)
    check_matmul(matmul)
    lambd = float(lambd)
    eps = check_positive_float("eps", eps)
    backend = select_backend("barlow_twins_loss", z1.device, {
        "triton": lambda: kernel_dtype_reason(z1, z2),
        "reference": lambda: None if group is None else "the reference runs in one process only",
    })
    if backend == "reference":
        raise_if_not_finite(z1=z1.sum(0), z2=z2.sum(0))
        return barlow_twins_loss_original(z1.float() if z1.dtype != torch.float64 else z1,
                                          z2.float() if z2.dtype != torch.float64 else z2, lambd, eps)
    return _BarlowTwins.apply(z1.contiguous(), z2.contiguous(), lambd, eps, group, gram_form, matmul)
