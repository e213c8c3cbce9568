"""Differentiable sorting networks (diffsort's semantics, REFERENCE.md section 4) in plain
PyTorch: the network tables shared with the Triton kernels, the six relaxed comparators, and
the reference sort (CPU fallback, test oracle in float64, benchmark baseline).

Wires and labels
----------------
A network on ``n`` inputs runs on ``N = next_power_of_two(n)`` wires. Bitonic networks pad the
*top* of the wire array (diffsort discards the first ``N - n`` wires); odd-even transposition
needs no padding, but the kernels want a power-of-two tile, so the extra wires sit at the end
and never meet a comparator. Wires are relabelled so that input ``i`` always sits on label
``i`` and the padding on labels ``n .. N-1``; then loads, stores and P's rows and columns need
no index arithmetic. ``P[i, j]`` is the weight of input ``i`` on output (label) ``j``.

Layer tables
------------
Each layer is stored as one int32 per wire label ``w``::

    code = partner * 4 + is_lo * 2 + self_alpha

``partner == w`` marks a wire that passes through (no comparator, or a comparator that touches
a discarded wire: diffsort then combines the real wire with itself with weights 1/2 and 1/2,
which is the identity). For a comparator on wires (lo, hi) in diffsort's wire order, with
``d = x[hi] - x[lo]`` and ``alpha = F(steepness * d)``, the outputs are ``min = alpha * x[lo] +
(1 - alpha) * x[hi]`` and ``max = (1 - alpha) * x[lo] + alpha * x[hi]``; the minimum goes to
the lower wire unless the bitonic block runs in reverse. So every wire takes

    new[w] = c[w] * old[w] + (1 - c[w]) * old[partner],   c = alpha if self_alpha else 1 - alpha

and both ends of a comparator share the same ``c`` (the 2 x 2 mixing block is symmetric). The
same update applies to the columns of P that the wires carry.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.profiler import record_function

from fastssl.profiling import SORTING

NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal")


def check_network(network) -> str:
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
    return network


def check_distribution(distribution) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    return distribution


def padded_size(n: int) -> int:
    return 1 << max(1, math.ceil(math.log2(n)))


def _bitonic_comparators(n: int):
    """Per layer, a list of (lo, hi, reversed) on diffsort's padded wires, and the offset of
    the first real wire. Comparators with a discarded wire are omitted (pass-through)."""
    blocks = math.ceil(math.log2(n))
    size = 1 << blocks
    first_real = size - n
    layers = []
    for block in range(blocks):
        for step in range(block + 1):
            distance = 1 << (block - step)
            layer = []
            for start in range(0, size, 2 * distance):
                for lo in range(start, start + distance):
                    hi = lo + distance
                    if lo >= first_real and hi >= first_real:
                        layer.append((lo, hi, (lo >> (block + 1)) & 1 == 1))
            layers.append(layer)
    return layers, first_real, size


def _odd_even_comparators(n: int):
    layers = [[(lo, lo + 1, False) for lo in range(layer % 2, n - 1, 2)] for layer in range(n)]
    return layers, 0, n


@functools.lru_cache(maxsize=None)
def network_codes(network: str, n: int) -> np.ndarray:
    """The (layers, N) int32 table of a network on ``n`` inputs; see the module docstring."""
    check_network(network)
    if n < 2:
        raise ValueError(f"sorting networks need n >= 2, got {n}")
    layers, first_real, size = (_bitonic_comparators if network == "bitonic" else _odd_even_comparators)(n)
    N = padded_size(n)

    def label(wire: int) -> int:
        return (wire - first_real) % size

    codes = np.tile(np.arange(N, dtype=np.int64) * 4, (len(layers), 1))
    for k, layer in enumerate(layers):
        for lo, hi, reverse in layer:
            self_alpha = 0 if reverse else 1
            codes[k, label(lo)] = label(hi) * 4 + 2 + self_alpha
            codes[k, label(hi)] = label(lo) * 4 + self_alpha
    codes = codes.astype(np.int32)
    codes.setflags(write=False)
    return codes


@functools.lru_cache(maxsize=None)
def _codes_on(network: str, n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(network_codes(network, n), device=device)


def network_codes_tensor(network: str, n: int, device) -> torch.Tensor:
    """:func:`network_codes` as an int32 tensor, moved to ``device`` once and cached."""
    return _codes_on(network, n, torch.device(device))


def comparator_count(network: str, n: int) -> int:
    codes = network_codes(network, n)
    return int(((codes >> 2) != np.arange(codes.shape[1])).sum()) // 2


def relaxed_min_weight(d: torch.Tensor, steepness: float, distribution: str, art_lambda: float = 0.25):
    """alpha = the weight of the lower wire's value in the soft minimum, for ``d = x[hi] -
    x[lo]`` (REFERENCE.md section 4)."""
    if distribution == "logistic":
        return torch.sigmoid(d * steepness)
    if distribution == "logistic_phi":
        return torch.sigmoid(d * steepness / (d.abs() + 1e-10).pow(art_lambda))
    v = steepness * d
    if distribution == "gaussian":
        return 0.5 + 0.5 * torch.erf(v / math.sqrt(2.0))
    if distribution == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    if distribution == "cauchy":
        return torch.atan(v) / math.pi + 0.5
    if distribution == "optimal":
        outside = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)
        return v.clamp(-0.25, 0.25) + 0.5 + outside * (0.25 - 0.0625 / (v.abs() + 1e-10))
    raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")


def soft_sort_reference(
    x: torch.Tensor,
    steepness: float = 10.0,
    network: str = "bitonic",
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_sorted, P)`` for rows ``x`` of shape (..., n), ascending, ``x_sorted = x @ P``,
    computed in ``x``'s dtype (float16/bfloat16 rows are computed in float32 and the outputs
    cast back). Differentiable by autograd; O(layers * N^2) memory per row, like diffsort."""
    check_network(network)
    check_distribution(distribution)
    with record_function(SORTING):
        n = x.shape[-1]
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        codes = network_codes_tensor(network, n, x.device).long()
        N = codes.shape[1]
        partners, is_lo, self_alpha = codes >> 2, (codes >> 1) & 1 == 1, codes & 1 == 1
        through = partners == torch.arange(N, device=x.device)
        values = torch.nn.functional.pad(x.to(compute), (0, N - n))
        P = torch.eye(N, dtype=compute, device=x.device).expand(*x.shape[:-1], N, N)
        for k in range(codes.shape[0]):
            partner = partners[k]
            x_partner = values[..., partner]
            d = torch.where(is_lo[k], x_partner - values, values - x_partner)
            alpha = relaxed_min_weight(d, steepness, distribution, art_lambda)
            c = torch.where(through[k], torch.ones_like(alpha), torch.where(self_alpha[k], alpha, 1 - alpha))
            values = c * values + (1 - c) * x_partner
            P = c[..., None, :] * P + (1 - c)[..., None, :] * P[..., partner]
        return values[..., :n].to(x.dtype), P[..., :n, :n].to(x.dtype)


class DiffSortNetReference(torch.nn.Module):
    """``soft_sort_reference`` behind diffsort's module signature."""

    def __init__(self, sorting_network_type: str, size: int, steepness: float = 10.0, art_lambda: float = 0.25,
                 distribution: str = "cauchy"):
        super().__init__()
        self.sorting_network_type, self.size = check_network(sorting_network_type), size
        self.steepness, self.art_lambda, self.distribution = steepness, art_lambda, check_distribution(distribution)

    def forward(self, vectors: torch.Tensor):
        return soft_sort_reference(vectors, self.steepness, self.sorting_network_type, self.distribution,
                                   self.art_lambda)
