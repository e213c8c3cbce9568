"""Drop-in for diffsort's ``DiffSortNet``."""

from __future__ import annotations

import torch
from torch import nn

from fastssl._checks import check_positive_int
from fastssl.ops.soft_sort import soft_sort
from fastssl.reference.diffsort import check_distribution, check_network


class DiffSortNet(nn.Module):
    """``DiffSortNet(sorting_network_type, size, steepness=10.0, art_lambda=0.25,
    distribution="cauchy")(x)`` -> ``(x_sorted, P)``, diffsort's module on
    :func:`fastssl.ops.soft_sort`.

    ``x``: (B, n) rows with n == ``size`` (any leading dimensions are accepted too). diffsort's
    ``device`` argument is not needed (the network tables follow the input's device) and its
    deprecated ``interpolation_type`` alias is not supported.
    """

    def __init__(self, sorting_network_type: str, size: int, steepness: float = 10.0, art_lambda: float = 0.25,
                 distribution: str = "cauchy"):
        super().__init__()
        self.sorting_network_type = check_network(sorting_network_type)
        self.size = check_positive_int("size", size)
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        self.steepness = float(steepness)
        self.art_lambda = float(art_lambda)
        self.distribution = check_distribution(distribution)

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if vectors.shape[-1] != self.size:
            raise ValueError(f"vectors must have size={self.size} entries per row, got shape {tuple(vectors.shape)}")
        return soft_sort(vectors, self.steepness, self.sorting_network_type, self.distribution, self.art_lambda)

    def extra_repr(self) -> str:
        return (f"{self.sorting_network_type!r}, size={self.size}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}")
