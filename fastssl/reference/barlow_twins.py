"""Barlow Twins and VICReg losses in plain PyTorch (REFERENCE.md section 3).

These are the official losses for one process holding the whole (global) batch: the oracle
for fastssl's single-process and distributed results, and the benchmark baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (the official helper)."""
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss_original(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5):
    """facebookresearch/barlowtwins: BatchNorm1d(affine=False) in training mode (biased
    variance over the batch), ``c = bn(z1).T @ bn(z2) / N``,
    ``sum (diag(c) - 1)^2 + lambd * sum off_diagonal(c)^2``."""
    z1n = F.batch_norm(z1, None, None, training=True, eps=eps)
    z2n = F.batch_norm(z2, None, None, training=True, eps=eps)
    c = z1n.T @ z2n
    c = c / z1.shape[0]
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss_original(x: torch.Tensor, y: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                         cov_coeff: float = 1.0):
    """facebookresearch/vicreg for one process: invariance (MSE), variance (hinge on the
    unbiased std with 1e-4), covariance (off-diagonal squares / D)."""
    N, D = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (N - 1)
    cov_y = (y.T @ y) / (N - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum().div(D) + off_diagonal(cov_y).pow(2).sum().div(D)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
