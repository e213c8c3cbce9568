"""VICReg loss (facebookresearch/vicreg) with the covariance term in Gram form.

``sum_ij cov_ij^2 = ||Xc.T Xc||_F^2 / (N - 1)^2 = ||Xc Xc.T||_F^2 / (N - 1)^2`` for the
centered (N, D) batch Xc, so the off-diagonal covariance penalty needs an N x N Gram matrix
instead of the D x D covariance when N < D (O(N^2 D) instead of O(N D^2)). The terms are
plain PyTorch ops differentiated by autograd, in float32; the batch is gathered across
ranks with an autograd-aware all-gather, as the official FullGatherLayer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.distributed import ProcessGroup
from fastssl.ops.barlow_twins import check_view_pair, raise_if_not_finite


def _gather(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group is None:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x, group=group), dim=0)


def _variance_and_covariance_terms(x: torch.Tensor, gram_form: bool):
    """(mean hinge on the std, sum of squared off-diagonal covariances / D) of (N, D) x."""
    N, D = x.shape
    xc = x - x.mean(dim=0)
    var = xc.square().sum(0) / (N - 1)
    std_term = torch.mean(F.relu(1 - torch.sqrt(var + 0.0001)))
    if gram_form:
        gram = xc @ xc.t()
        off_diagonal_sq = gram.square().sum() / (N - 1) ** 2 - var.square().sum()
    else:
        cov = xc.t() @ xc / (N - 1)
        off_diagonal_sq = cov.square().sum() - torch.diagonal(cov).square().sum()
    return std_term, off_diagonal_sq / D


def vicreg_loss(
    x: torch.Tensor, y: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
    cov_coeff: float = 1.0, group: ProcessGroup = None, formulation: str = "auto",
) -> torch.Tensor:
    """The VICReg loss of two (N_local, D) embedding batches.

    ``sim_coeff * mse(x, y)`` (this rank's batch, as the official code) ``+ std_coeff *``
    the mean hinge ``relu(1 - sqrt(var + 1e-4))`` over both views ``/ 2 + cov_coeff *`` the
    squared off-diagonal covariances ``/ D`` of both views, variance and covariance over
    the global batch (unbiased). ``formulation``: "gram", "cross" or "auto" (Gram when
    N_global < D). Returns a float32 scalar.
    """
    group, _, gram_form = check_view_pair(x, y, group, formulation, names=("x", "y"))
    compute = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(compute), y.to(compute)
    raise_if_not_finite(x=x.detach().sum(0), y=y.detach().sum(0))
    repr_loss = F.mse_loss(x, y)
    std_x, cov_x = _variance_and_covariance_terms(_gather(x, group), gram_form)
    std_y, cov_y = _variance_and_covariance_terms(_gather(y, group), gram_form)
    return sim_coeff * repr_loss + std_coeff * (std_x + std_y) / 2 + cov_coeff * (cov_x + cov_y)
