"""Barlow Twins and VICReg loss modules."""

from __future__ import annotations

import torch
from torch import nn

from fastssl._checks import check_positive_float
from fastssl.distributed import ProcessGroup
from fastssl.ops.barlow_twins import barlow_twins_loss
from fastssl.ops.vicreg import vicreg_loss


class BarlowTwinsLoss(nn.Module):
    """``BarlowTwinsLoss(lambd=0.0051)(z1, z2)``: the loss of facebookresearch/barlowtwins
    for two (N, D) projector outputs, including its BatchNorm1d(affine=False) (which has no
    parameters, so there is nothing to load). Differences from the official module, by
    design: statistics and C always cover the global batch (as with SyncBatchNorm), the
    gradient is correct under DDP (the official all-reduce of C is not autograd-aware), and
    no D x D buffer is allocated when N < D. See :func:`fastssl.ops.barlow_twins_loss`."""

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5, group: ProcessGroup = None,
                 formulation: str = "auto"):
        super().__init__()
        self.lambd = float(lambd)
        self.eps = check_positive_float("eps", eps)
        self.group = group
        self.formulation = formulation

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z1, z2, self.lambd, self.eps, self.group, self.formulation)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, eps={self.eps}, formulation={self.formulation!r}"


class VICRegLoss(nn.Module):
    """``VICRegLoss(sim_coeff=25, std_coeff=25, cov_coeff=1)(x, y)``: the loss of
    facebookresearch/vicreg for two (N, D) projector outputs, with the covariance penalty in
    Gram form when N < D. See :func:`fastssl.ops.vicreg_loss`."""

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 group: ProcessGroup = None, formulation: str = "auto"):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.group = group
        self.formulation = formulation

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vicreg_loss(x, y, self.sim_coeff, self.std_coeff, self.cov_coeff, self.group, self.formulation)
