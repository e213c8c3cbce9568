"""Differentiable sorting networks (diffsort): Triton kernels, custom ops, functional API.

Semantics: :mod:`fastssl.reference.diffsort` (bitonic or odd-even transposition networks, six
relaxed comparators, ``x_sorted = x @ P``). The reference, like diffsort, applies each layer as
dense (n x c) split and combine products; here each comparator is what it really is, a
two-column update, and all of a row's state stays on chip.

Per row the kernels hold the wire values ``x`` (N,) and a tile of P (TILE rows of inputs x N
wires, N = next power of two >= n) in registers. A layer is read from a small int32 table
(one code per wire: partner wire, which end of the comparator, which weight it keeps; cached
per (network, n) on each device) and applied as

    x_p = x[partner];  d = x[hi] - x[lo];  alpha = F(steepness * d)
    c = alpha or 1 - alpha (1 for wires that pass through)
    x = c * x + (1 - c) * x_p;    P[:, w] = c[w] * P[:, w] + c'[w] * P[:, partner[w]]

with ``tl.gather`` fetching the partner column. Work per row and layer: O(N) for the values,
O(TILE * N) per P tile, i.e. O(n * comparators) per row instead of diffsort's O(n^2 * c) per
layer.

Kernels (R rows, L layers, e-byte input and output elements; N = 64, L = 21 for NeCo's n = 49):

- ``_soft_sort_forward_kernel``: grid (R, N / TILE). Every program runs the value recursion
  (cheap, O(N L)) and its P tile through all L layers, then writes its rows of P and the first
  tile also x_sorted. Reads ``n*e`` and writes ``(n + n^2)*e`` bytes per row; about
  ``5 * N^2 * L`` FLOPs per row (two multiplies, one add, one subtract per P entry per layer,
  plus the gather): 430 kFLOP for NeCo's rows.
- ``_soft_sort_backward_kernel``: persistent grid (a few programs per SM, each looping over
  rows). For each P tile it reruns the forward, writing a checkpoint of (x, P tile) every
  ``EVERY ~ sqrt(L)`` layers to a per-program scratch, then walks the layers backwards: it
  rebuilds the state before layer k from the nearest checkpoint (at most EVERY - 1 layers),
  accumulates the P part of dL/dalpha (a column-pair inner product of the adjoint G and P),
  and applies the transposed layer to G, which equals the layer itself because each
  comparator's 2 x 2 mixing block is symmetric. The per-layer dL/dalpha sums over tiles go to
  an (R, L, N) float32 buffer. A final backward sweep over the values adds the x_sorted part
  and chains dL/dalpha through ``F'`` into dL/dx. No per-layer activation is saved between
  forward and backward: autograd keeps only the input. Backward reads ``(n + n + n^2)*e``
  bytes per row (x, grad x_sorted, grad P) and writes ``n*e``; the scratch holds
  ``ceil(L / EVERY) * (TILE + 1) * N`` floats per program and the buffer ``L * N`` floats per
  row. FLOPs are about three forwards' worth (forward, recomputation, adjoint):
  ``~15 * N^2 * L`` per row.

Inputs are float32, bfloat16 or float16 (computed in float32; outputs in the input dtype).
float64 runs on the reference backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastssl._checks import check_finite, check_float_tensor
from fastssl.backend import Reason, select_backend, triton_interpreter_enabled
from fastssl.ops._soft_sort_native import (
    native_backward_fake,
    soft_sort_backward_native,
    soft_sort_forward_native,
    why_not_native,
)
from fastssl.ops.launch import first_that_fits
from fastssl.ops.triton_math import programs_per_wave
from fastssl.reference.diffsort import (
    DISTRIBUTIONS,
    check_distribution,
    check_network,
    network_codes,
    network_codes_tensor,
    padded_size,
    soft_sort_reference,
)

# Default order: Triton before the CUDA kernels until a GPU measurement says otherwise; on the
# CPU the C++ kernels (measured about 70x faster than the PyTorch reference at NeCo's shape).
DEFAULT_BACKENDS = ("triton", "cuda", "cpp", "reference")
TILE_ELEMENTS = 4096
# The Triton interpreter pays per operation, not per element: there, whole P per program and a
# checkpoint before every layer (no recomputation). Tests override both to run the GPU's path.
INTERPRETER_TILE_ELEMENTS = 65536
INTERPRETER_CHECKPOINT_EVERY = 1
MAX_N = 4096
PI = tl.constexpr(3.141592653589793)
INV_PI = tl.constexpr(0.3183098861837907)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sigmoid(v):
    """1 / (1 + exp(-v)) with a correctly rounded division (tl.sigmoid's is div.full.f32)."""
    return tl.math.div_rn(1.0, 1.0 + tl.exp(-v))


@triton.jit
def _relaxed_min_weight(d, steepness, art_lambda, DISTRIBUTION: tl.constexpr):
    """alpha = F(steepness * d) for ``d = x[hi] - x[lo]``, 1 - alpha and dalpha/dd (the formulas
    of :func:`fastssl.reference.diffsort.relaxed_min_weight`).

    Divisions are correctly rounded (tl.math.div_rn), or products with a reciprocal constant:
    a GPU's ``/`` is div.full.f32, up to 2 ulp off, and a comparator near a tie amplifies its
    weight's error by up to steepness / pi through every later layer. They are per wire and
    layer, O(N) beside the O(TILE * N) column mixing, so exactness costs little."""
    if DISTRIBUTION == 0:  # logistic
        alpha = _sigmoid(d * steepness)
        slope = steepness * alpha * (1.0 - alpha)
    elif DISTRIBUTION == 1:  # logistic_phi: sigmoid(steepness * d / (|d| + 1e-10)^lambda)
        a = tl.abs(d) + 1e-10
        scale = tl.math.div_rn(steepness, tl.exp2(art_lambda * tl.log2(a)))
        alpha = _sigmoid(d * scale)
        slope = alpha * (1.0 - alpha) * scale * (1.0 - art_lambda * tl.math.div_rn(tl.abs(d), a))
    elif DISTRIBUTION == 2:  # gaussian
        v = steepness * d
        alpha = 0.5 + 0.5 * tl.erf(v * INV_SQRT_2)
        slope = steepness * INV_SQRT_2PI * tl.exp(-0.5 * v * v)
    elif DISTRIBUTION == 3:  # reciprocal
        v = steepness * d
        alpha = 0.5 * (tl.math.div_rn(v, 2.0 + tl.abs(v)) + 1.0)
        slope = tl.math.div_rn(steepness, (2.0 + tl.abs(v)) * (2.0 + tl.abs(v)))
    elif DISTRIBUTION == 4:  # cauchy: arctan by reduction to |t| <= tan(pi/8) and a degree-9 odd
        # minimax polynomial (the classic single-precision scheme, about 1 ulp)
        v = steepness * d
        a = tl.abs(v)
        big = a > 2.414213562373095
        mid = a > 0.4142135623730950
        t = tl.where(big, tl.math.div_rn(-1.0, tl.where(big, a, 1.0)),
                     tl.where(mid, tl.math.div_rn(a - 1.0, a + 1.0), a))
        z = t * t
        p = ((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1
        atan = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0)) + (p * z * t + t)
        alpha = tl.where(v < 0, -atan, atan) * INV_PI + 0.5
        # (1 + v^2) * PI, not PI * (1 + v^2): under the interpreter a constexpr times a tensor
        # stays a constexpr, which div_rn refuses.
        slope = tl.math.div_rn(steepness, (1.0 + v * v) * PI)
    else:  # optimal
        v = steepness * d
        outside = tl.where(v > 0.25, 1.0, 0.0) - tl.where(v < -0.25, 1.0, 0.0)
        denominator = tl.abs(v) + 1e-10
        alpha = tl.minimum(tl.maximum(v, -0.25), 0.25) + 0.5 + outside * (0.25 - tl.math.div_rn(0.0625, denominator))
        slope = steepness * tl.where(tl.abs(v) <= 0.25, 1.0, tl.math.div_rn(0.0625, denominator * denominator))
    return alpha, 1.0 - alpha, slope


@triton.jit
def _layer_weights(codes_ptr, k, x, wires, steepness, art_lambda, N: tl.constexpr, DISTRIBUTION: tl.constexpr):
    """Decode layer k and compute every wire's kept weight ``c`` (see the module docstring).
    Returns (partner, through, is_lo, keeps_alpha, x_partner, c, c', dalpha/dd) where c' = 1 - c
    is the partner's weight."""
    code = tl.load(codes_ptr + k * N + wires)
    partner = code >> 2
    through = partner == wires
    is_lo = (code & 2) != 0
    keeps_alpha = (code & 1) != 0
    x_partner = tl.gather(x, partner, 0)
    d = tl.where(is_lo, x_partner - x, x - x_partner)
    alpha, beta, slope = _relaxed_min_weight(d, steepness, art_lambda, DISTRIBUTION)
    c = tl.where(through, 1.0, tl.where(keeps_alpha, alpha, beta))
    c_other = tl.where(through, 0.0, tl.where(keeps_alpha, beta, alpha))
    return partner, through, is_lo, keeps_alpha, x_partner, c, c_other, slope


@triton.jit
def _mix_columns(P, partner, c, c_other, TILE: tl.constexpr, N: tl.constexpr):
    """Column w of the (TILE, N) tile becomes ``c[w] * P[:, w] + c'[w] * P[:, partner[w]]``."""
    P_partner = tl.gather(P, tl.broadcast_to(partner[None, :], (TILE, N)), 1)
    return c[None, :] * P + c_other[None, :] * P_partner


@triton.jit
def _sort_tile(codes_ptr, n_layers, x, P, wires, steepness, art_lambda,
               TILE: tl.constexpr, N: tl.constexpr, DISTRIBUTION: tl.constexpr):
    """Run values ``x`` and a P tile through every layer."""
    for k in range(n_layers):
        partner, _, _, _, x_partner, c, c_other, _ = _layer_weights(codes_ptr, k, x, wires, steepness, art_lambda,
                                                           N, DISTRIBUTION)
        P = _mix_columns(P, partner, c, c_other, TILE, N)
        x = c * x + c_other * x_partner
    return x, P


@triton.jit
def _load_row(ptr, row, n, stride_r, stride_c, wires):
    return tl.load(ptr + row * stride_r + wires * stride_c, mask=wires < n, other=0.0).to(tl.float32)


@triton.jit
def _identity_tile(tile, wires, TILE: tl.constexpr):
    inputs = tile * TILE + tl.arange(0, TILE)
    return inputs, tl.where(inputs[:, None] == wires[None, :], 1.0, 0.0)


@triton.jit
def _soft_sort_forward_kernel(
    x_ptr, codes_ptr, x_sorted_ptr, p_ptr,
    n, n_layers, stride_xr, stride_xc, steepness, art_lambda,
    N: tl.constexpr, TILE: tl.constexpr, DISTRIBUTION: tl.constexpr,
):
    """x_sorted (first tile only) and rows [tile * TILE, ...) of P for row program_id(0)."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    wires = tl.arange(0, N)
    x = _load_row(x_ptr, row, n, stride_xr, stride_xc, wires)
    inputs, P = _identity_tile(tile, wires, TILE)
    x, P = _sort_tile(codes_ptr, n_layers, x, P, wires, steepness, art_lambda, TILE, N, DISTRIBUTION)
    tl.store(x_sorted_ptr + row * n + wires, x.to(x_sorted_ptr.dtype.element_ty), mask=(wires < n) & (tile == 0))
    offsets = row * n * n + inputs[:, None] * n + wires[None, :]
    tl.store(p_ptr + offsets, P.to(p_ptr.dtype.element_ty), mask=(inputs[:, None] < n) & (wires[None, :] < n))


@triton.jit
def _neco_output_adjoint(P, teacher_ptr, codes_ptr, row, tile, n, n_layers, stride_tr, stride_tc, grad_rows_ptr,
                         wires, teacher_steepness, art_lambda,
                         TILE: tl.constexpr, N: tl.constexpr, DISTRIBUTION: tl.constexpr):
    """dL/dP_student for the row loss ``-(1/n) sum_ij P_t log P_s`` times the upstream
    gradient: ``-(g / n) * P_t / P_s``, 0 where P_s underflowed to 0 (the guard's clamp)."""
    x_t = _load_row(teacher_ptr, row, n, stride_tr, stride_tc, wires)
    inputs, P_t = _identity_tile(tile, wires, TILE)
    x_t, P_t = _sort_tile(codes_ptr, n_layers, x_t, P_t, wires, teacher_steepness, art_lambda, TILE, N,
                          DISTRIBUTION)
    valid = (inputs[:, None] < n) & (wires[None, :] < n)
    scale = tl.math.div_rn(tl.load(grad_rows_ptr + row), n.to(tl.float32))
    return tl.where(valid & (P > 0), tl.math.div_rn(-(P_t * scale), tl.where(P > 0, P, 1.0)), 0.0)


@triton.jit
def _soft_sort_backward_kernel(
    x_ptr, codes_ptr, grad_xs_ptr, grad_p_ptr, grad_x_ptr, alpha_grad_ptr, scratch_x_ptr, scratch_p_ptr,
    teacher_ptr, grad_rows_ptr,
    R, n, n_layers, n_tiles, n_checkpoints, every,
    stride_xr, stride_xc, stride_gsr, stride_gsc, stride_gpr, stride_gpi, stride_gpj, stride_tr, stride_tc,
    steepness, teacher_steepness, art_lambda,
    N: tl.constexpr, TILE: tl.constexpr, DISTRIBUTION: tl.constexpr,
    HAS_GRAD_XS: tl.constexpr, HAS_GRAD_P: tl.constexpr, NECO: tl.constexpr,
):
    """dL/dx for rows program_id(0), program_id(0) + num_programs, ... (see the module
    docstring). With NECO the output adjoint of P is the NeCo loss's (teacher rows from
    ``teacher_ptr``, upstream per-row gradients from ``grad_rows_ptr``) and x_sorted has none.

    Global scratch written and read back by one program goes through threads that may
    differ (the store and load layouts differ), so a CTA barrier separates every phase.
    """
    pid = tl.program_id(0)
    wires = tl.arange(0, N)
    tile_offsets = tl.arange(0, TILE)[:, None] * N + wires[None, :]
    checkpoint_x = scratch_x_ptr + pid.to(tl.int64) * n_checkpoints * N
    checkpoint_p = scratch_p_ptr + pid.to(tl.int64) * n_checkpoints * TILE * N
    for program_row in range(pid, R, tl.num_programs(0)):
        row = tl.cast(program_row, tl.int64)
        x_row = _load_row(x_ptr, row, n, stride_xr, stride_xc, wires)
        alpha_grad_row = alpha_grad_ptr + row * n_layers * N
        for tile in range(n_tiles):
            # Forward, checkpointing (x, P tile) before layers 0, every, 2 * every, ...
            x = x_row
            inputs, P = _identity_tile(tile, wires, TILE)
            for k in range(n_layers):
                if k % every == 0:
                    tl.store(checkpoint_x + (k // every) * N + wires, x)
                    tl.store(checkpoint_p + (k // every) * TILE * N + tile_offsets, P)
                partner, _, _, _, x_partner, c, c_other, _ = _layer_weights(
                    codes_ptr, k, x, wires, steepness, art_lambda, N, DISTRIBUTION)
                P = _mix_columns(P, partner, c, c_other, TILE, N)
                x = c * x + c_other * x_partner
            valid = (inputs[:, None] < n) & (wires[None, :] < n)
            if NECO:
                G = _neco_output_adjoint(P, teacher_ptr, codes_ptr, row, tile, n, n_layers, stride_tr, stride_tc,
                                         grad_rows_ptr, wires, teacher_steepness, art_lambda, TILE, N, DISTRIBUTION)
            elif HAS_GRAD_P:
                G = tl.load(grad_p_ptr + row * stride_gpr + inputs[:, None] * stride_gpi + wires[None, :] * stride_gpj,
                            mask=valid, other=0.0).to(tl.float32)
            else:
                G = tl.zeros([TILE, N], dtype=tl.float32)
            tl.debug_barrier()
            for step in range(n_layers):
                k = n_layers - 1 - step
                start = (k // every) * every
                x = tl.load(checkpoint_x + (k // every) * N + wires)
                P = tl.load(checkpoint_p + (k // every) * TILE * N + tile_offsets)
                for j in range(start, k):
                    partner, _, _, _, x_partner, c, c_other, _ = _layer_weights(codes_ptr, j, x, wires, steepness,
                                                                       art_lambda, N, DISTRIBUTION)
                    P = _mix_columns(P, partner, c, c_other, TILE, N)
                    x = c * x + c_other * x_partner
                partner, through, _, keeps_alpha, _, c, c_other, _ = _layer_weights(codes_ptr, k, x, wires, steepness,
                                                                           art_lambda, N, DISTRIBUTION)
                sign = tl.where(through, 0.0, tl.where(keeps_alpha, 1.0, -1.0))  # dc/dalpha
                P_partner = tl.gather(P, tl.broadcast_to(partner[None, :], (TILE, N)), 1)
                part = tl.sum(G * (P - P_partner), axis=0) * sign
                previous = tl.load(alpha_grad_row + k * N + wires, mask=(wires < N) & (tile > 0), other=0.0)
                tl.store(alpha_grad_row + k * N + wires, previous + part)
                G = _mix_columns(G, partner, c, c_other, TILE, N)  # the layer is its own transpose
            tl.debug_barrier()

        # Values: dL/dx_sorted back through the layers, plus every dL/dalpha through F'.
        if HAS_GRAD_XS:
            g = _load_row(grad_xs_ptr, row, n, stride_gsr, stride_gsc, wires)
        else:
            g = tl.zeros([N], dtype=tl.float32)
        for step in range(n_layers):
            k = n_layers - 1 - step
            start = (k // every) * every
            x = tl.load(checkpoint_x + (k // every) * N + wires)
            for j in range(start, k):
                partner, _, _, _, x_partner, c, c_other, _ = _layer_weights(
                    codes_ptr, j, x, wires, steepness, art_lambda, N, DISTRIBUTION)
                x = c * x + c_other * x_partner
            partner, through, is_lo, keeps_alpha, x_partner, c, c_other, slope = _layer_weights(
                codes_ptr, k, x, wires, steepness, art_lambda, N, DISTRIBUTION)
            sign = tl.where(through, 0.0, tl.where(keeps_alpha, 1.0, -1.0))
            part = tl.load(alpha_grad_row + k * N + wires) + sign * g * (x - x_partner)
            alpha_grad = part + tl.gather(part, partner, 0)  # both ends of the comparator
            d_grad = tl.where(through, 0.0, alpha_grad * slope)
            g = c * g + c_other * tl.gather(g, partner, 0) + tl.where(is_lo, -d_grad, d_grad)
        tl.store(grad_x_ptr + row * n + wires, g.to(grad_x_ptr.dtype.element_ty), mask=wires < n)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- launchers


def distribution_id(distribution: str) -> int:
    return DISTRIBUTIONS.index(check_distribution(distribution))


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and triton_interpreter_enabled()


def launch_shape(n: int, device: torch.device, tile: Optional[int] = None) -> tuple[int, int, int]:
    """(N, TILE, num_warps): the padded wire count, P rows per program (a given ``tile``, or
    the largest), warps."""
    N = padded_size(n)
    elements = INTERPRETER_TILE_ELEMENTS if _interpreting(device) else TILE_ELEMENTS
    tile = tile or max(1, min(N, elements // N))
    return N, tile, max(1, min(8, tile * N // 512))


def backward_tiles(n: int, device: torch.device) -> list[int]:
    """The backward's candidate P tiles, best first: the forward's, then halved twice, for
    GPUs where the compiler spills its registers (the NeCo adjoint on sm_86 and newer;
    :func:`fastssl.ops.launch.first_that_fits` takes the first that does not)."""
    tile = launch_shape(n, device)[1]
    return [tile >> shift for shift in range(3) if tile >> shift >= 1]


def checkpoint_interval(n_layers: int, device: torch.device) -> int:
    """Layers between checkpoints: about sqrt(L), so that checkpoints and recomputation
    (at most EVERY - 1 layers per layer) both stay O(sqrt(L))."""
    if _interpreting(device) and INTERPRETER_CHECKPOINT_EVERY:
        return INTERPRETER_CHECKPOINT_EVERY
    return math.isqrt(max(n_layers - 1, 0)) + 1


def backward_programs(rows: int, device: torch.device) -> int:
    return min(rows, programs_per_wave(device, elsewhere=4))


def _soft_sort_forward_triton(x, steepness, network, distribution, art_lambda):
    rows, n = x.shape
    codes = network_codes_tensor(network, n, x.device)
    N, tile, num_warps = launch_shape(n, x.device)
    x_sorted = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    P = torch.empty((rows, n, n), dtype=x.dtype, device=x.device)
    _soft_sort_forward_kernel[(rows, N // tile)](
        x, codes, x_sorted, P, n, codes.shape[0], x.stride(0), x.stride(1), float(steepness), float(art_lambda),
        N=N, TILE=tile, DISTRIBUTION=distribution_id(distribution), num_warps=num_warps,
    )
    return x_sorted, P


def soft_sort_backward_triton(x, grad_x_sorted, grad_P, steepness, network, distribution, art_lambda,
                              teacher=None, grad_rows=None, teacher_steepness=0.0, launch=True):
    """dL/dx of (R, n) rows. With ``teacher`` (and ``grad_rows``, float32 (R,)) the output
    adjoint is the NeCo loss's instead of (grad_x_sorted, grad_P). ``launch=False`` (the
    fakes): the same allocations, with the first candidate tile's scratch (the largest, an
    upper bound where a GPU takes a smaller one), and no kernel."""
    rows, n = x.shape
    n_layers = network_codes(network, n).shape[0]  # the device's table is fetched only to launch
    every = checkpoint_interval(n_layers, x.device)
    n_checkpoints = triton.cdiv(n_layers, every)
    programs = backward_programs(rows, x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    scratch_x = torch.empty((programs, n_checkpoints, padded_size(n)), **f32)
    alpha_grad = torch.empty((rows, n_layers, padded_size(n)), **f32)
    grad_x = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    neco = teacher is not None
    gs = grad_x_sorted if grad_x_sorted is not None else x
    gp = grad_P if grad_P is not None else x.new_empty((1, 1, 1))
    t = teacher if neco else x
    grad_rows = grad_rows if neco else x
    flags = dict(DISTRIBUTION=distribution_id(distribution), HAS_GRAD_XS=grad_x_sorted is not None and not neco,
                 HAS_GRAD_P=grad_P is not None and not neco, NECO=neco)

    if not launch:
        torch.empty((programs, n_checkpoints, backward_tiles(n, x.device)[0], padded_size(n)), **f32)
        return grad_x
    codes = network_codes_tensor(network, n, x.device)

    def launch_of(tile: int, scratch_p: torch.Tensor):
        N, tile, num_warps = launch_shape(n, x.device, tile)
        args = (x, codes, gs, gp, grad_x, alpha_grad, scratch_x, scratch_p, t, grad_rows,
                rows, n, n_layers, N // tile, n_checkpoints, every,
                x.stride(0), x.stride(1), gs.stride(0), gs.stride(1), gp.stride(0), gp.stride(1), gp.stride(2),
                t.stride(0), t.stride(1), float(steepness), float(teacher_steepness), float(art_lambda))
        return _soft_sort_backward_kernel, args, dict(N=N, TILE=tile, num_warps=num_warps, **flags)

    tile = first_that_fits(("soft_sort backward", x.dtype, n, tuple(flags.items())), x.device,
                           backward_tiles(n, x.device), lambda tile: [launch_of(tile, scratch_x)])
    kernel, args, kwargs = launch_of(tile, torch.empty((programs, n_checkpoints, tile, padded_size(n)), **f32))
    kernel[(programs,)](*args, **kwargs)
    return grad_x


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastssl::soft_sort_fwd", mutates_args=())
def _soft_sort_op(x: torch.Tensor, steepness: float, network: str, distribution: str,
                  art_lambda: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _soft_sort_forward_triton(x, steepness, network, distribution, art_lambda)
    x_sorted, P = soft_sort_forward_native(x, steepness, network, distribution, art_lambda)
    return x_sorted.to(x.dtype), P.to(x.dtype)


@_soft_sort_op.register_fake
def _(x, steepness, network, distribution, art_lambda, backend):
    # Triton writes x_sorted and P in x's dtype; the native kernels write float32, then cast.
    rows, n = x.shape
    if backend == "triton":
        return x.new_empty((rows, n)), x.new_empty((rows, n, n))
    x_sorted, P = (x.new_empty(shape, dtype=torch.float32) for shape in ((rows, n), (rows, n, n)))
    return x_sorted.to(x.dtype), P.to(x.dtype)


@torch.library.custom_op("fastssl::soft_sort_bwd", mutates_args=())
def soft_sort_backward_op(grad_x_sorted: Optional[torch.Tensor], grad_P: Optional[torch.Tensor], x: torch.Tensor,
                          steepness: float, network: str, distribution: str, art_lambda: float,
                          backend: str) -> torch.Tensor:
    if backend == "triton":
        return soft_sort_backward_triton(x, grad_x_sorted, grad_P, steepness, network, distribution, art_lambda)
    return soft_sort_backward_native(x, grad_x_sorted, grad_P, steepness, network, distribution,
                                     art_lambda).to(x.dtype)


@soft_sort_backward_op.register_fake
def _(grad_x_sorted, grad_P, x, steepness, network, distribution, art_lambda, backend):
    # Triton: dL/dx, the (R, L, N) float32 dL/dalpha buffer and the per-program checkpoint
    # scratch (the launcher without its kernel). Native: float32 dL/dx (and on a GPU the
    # extension's checkpoint workspace, sized by it) cast to x's dtype.
    if backend == "triton":
        return soft_sort_backward_triton(x, grad_x_sorted, grad_P, steepness, network, distribution, art_lambda,
                                         launch=False)
    return native_backward_fake(x, network, art_lambda, backend)


def _setup_context(ctx, inputs, output):
    x, *constants = inputs
    ctx.save_for_backward(x)
    ctx.constants = constants


def _backward(ctx, grad_x_sorted, grad_P):
    (x,) = ctx.saved_tensors
    return soft_sort_backward_op(grad_x_sorted, grad_P, x, *ctx.constants), None, None, None, None, None


_soft_sort_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def raise_if_not_finite(name: str, value: torch.Tensor) -> None:
    check_finite(name, value, "a sorting network's output would be NaN")


def check_sort_arguments(name: str, x, steepness, network, distribution, art_lambda) -> int:
    """Checks shared by the sorting ops; returns n."""
    check_float_tensor(name, x, min_dim=1)
    check_network(network)
    check_distribution(distribution)
    for arg, value in ((f"steepness{'' if name == 'x' else ' of ' + name}", steepness), ("art_lambda", art_lambda)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{arg} must be a finite number, got {value!r}")
    n = x.shape[-1]
    if n < 2:
        raise ValueError(f"{name} must have at least 2 entries along the last dimension (n >= 2), "
                         f"got shape {tuple(x.shape)}")
    return n


def why_not_triton(x: torch.Tensor, n: int) -> Reason:
    if x.dtype == torch.float64:
        return "the kernels compute in float32; float64 input runs on the reference backend"
    if n > MAX_N:
        return f"the kernels hold a row's P tile on chip, up to n = {MAX_N}; got n = {n}"
    return None


def soft_sort(
    x: torch.Tensor,
    steepness: float = 10.0,
    network: str = "bitonic",
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sort of rows with a relaxed sorting network (diffsort's ``sort``).

    Args:
        x: (..., n) rows, n >= 2; float32, bfloat16 or float16 on the kernels (computed in
            float32), float64 on the reference backend.
        steepness: inverse temperature of the relaxed comparators.
        network: ``"bitonic"`` (any n, padded to a power of two as diffsort does) or
            ``"odd_even"`` (odd-even transposition, n layers).
        distribution: ``"logistic"``, ``"logistic_phi"`` (uses ``art_lambda``), ``"gaussian"``,
            ``"reciprocal"``, ``"cauchy"`` or ``"optimal"``.
    Returns:
        ``(x_sorted, P)``: (..., n) ascending soft-sorted rows and (..., n, n) doubly
        stochastic matrices, ``P[..., i, j]`` = weight of input i at rank j and
        ``x_sorted = x @ P``; both in x's dtype and differentiable with respect to x.
    Raises ``ValueError`` for n < 2 or an unknown network or distribution; NaN/Inf rows stop it
    (:func:`fastssl._checks.check_finite`: a ValueError on the CPU, a device-side assert on a GPU).
    """
    n = check_sort_arguments("x", x, steepness, network, distribution, art_lambda)
    raise_if_not_finite("x", x)
    backend = select_backend("soft_sort", x.device, {
        "cuda": lambda: why_not_native(x, n),
        "triton": lambda: why_not_triton(x, n),
        "cpp": lambda: why_not_native(x, n),
        "reference": lambda: None,
    }, preference=DEFAULT_BACKENDS)
    if backend == "reference":
        return soft_sort_reference(x, float(steepness), network, distribution, float(art_lambda))
    rows = x.reshape(-1, n)
    x_sorted, P = _soft_sort_op(rows, float(steepness), network, distribution, float(art_lambda), backend)
    return x_sorted.view(x.shape), P.view(*x.shape, n)


def soft_sort_bytes(rows: int, n: int, dtype: torch.dtype) -> int:
    """Minimal traffic of one forward + backward: read x, write x_sorted and P; read x, the
    two output gradients, write dL/dx. Used by the benchmarks."""
    return (4 * n + 2 * n * n) * rows * torch.empty((), dtype=dtype).element_size()


def soft_sort_flops(rows: int, network: str, n: int) -> int:
    """The two-column formulation's work for forward + backward: 4 FLOPs per P entry a
    comparator touches (2 entries per input row), forward once and three times in backward."""
    from fastssl.reference.diffsort import comparator_count

    return 4 * 2 * n * comparator_count(network, n) * 4 * rows
