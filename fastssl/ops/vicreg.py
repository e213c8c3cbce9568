"""VICReg loss (facebookresearch/vicreg) on the Barlow Twins machinery.

For the centered global batch Xc (N, D) of one view, var = diag(Xc.T Xc) / (N - 1) and

    sum_{i != j} cov_ij^2 = ||Xc Xc.T||_F^2 / (N - 1)^2 - sum_i var_i^2     (Gram form, N x N)
                          = sum_{i != j} (Xc.T Xc)_ij^2 / (N - 1)^2         (cross form, D x D)

so the covariance penalty needs an N x N Gram matrix instead of the D x D covariance when
N < D (O(N^2 D) instead of O(N D^2)); the Gram kernel computes only the upper triangle of
the symmetric G (one process). With ``hinge_i = relu(1 - sqrt(var_i + 1e-4))`` and

    L = sim * mse(x, y) + std / 2 * (mean_i hinge_i(x) + mean_i hinge_i(y)) + cov / D * (
        sum_{i != j} cov_ij(x)^2 + sum_{i != j} cov_ij(y)^2),

the gradient of one view's variance and covariance terms with respect to Xc is

    dL/dXc = (4 cov / (D (N - 1)^2)) G Xc + Xc * d,
    d_i = -(4 cov var_i / (D (N - 1))) - [hinge_i > 0] std / (2 D (N - 1) sqrt(var_i + 1e-4)),

which the Barlow Twins backward kernel takes through the centering (no scaling), and the
invariance term adds 2 sim (x - y) / (N_local D). The Triton path uses the kernels of
:mod:`fastssl.ops.barlow_twins`: centering (its standardization with unit scale), the Gram
or cross-correlation kernel with the reduction in its epilogue, and the backward kernel.

Distributed: the official code all-gathers the embeddings (FullGatherLayer), so variance
and covariance cover the global batch while the invariance term is per rank. Here the
statistics are all-reduced as D-vectors and the centered views all-gathered (Gram form)
or the covariance all-reduced (cross form); the gradients of the global terms are scaled
by the world size, as the official all-gather's backward (a sum over ranks) does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastssl.backend import select_backend
from fastssl.distributed import ProcessGroup, gather_rows
from fastssl.ops.barlow_twins import (
    all_reduce,
    check_matmul,
    check_view_pair,
    cross_correlation,
    float32_matmul,
    global_mean_var,
    gram_pair,
    matmul_operand,
    raise_if_not_finite,
    standardize_backward,
    standardize_pair,
)
from fastssl.ops.dino_loss import kernel_dtype_reason

VARIANCE_EPS = 1e-4  # inside the official sqrt(var + 1e-4)


def _covariance_penalty(xc: torch.Tensor, var: torch.Tensor, dtype: torch.dtype, group: ProcessGroup,
                        n_global: int, gram_form: bool, matmul: str):
    """sum_{i != j} cov_ij^2 of one centered view, and what its backward needs.

    The matmul operands are Xc in the input dtype; the variance removed from ||G||_F^2
    comes from the same rounded operands, so the difference is exactly off-diagonal."""
    operand = xc.to(dtype)
    if gram_form:
        mm_var = var
        if operand.dtype != torch.float32:
            mm_var = all_reduce(operand.float().square().sum(0), group) / (n_global - 1)
        rows = gather_rows(operand, group)
        gram, _, frobenius = gram_pair(operand, rows, symmetric=group is None, matmul=matmul)  # this rank's rows
        penalty = all_reduce(frobenius, group) / (n_global - 1) ** 2 - mm_var.square().sum()
        return penalty, mm_var, (gram, rows)
    cov, penalty = cross_correlation(operand, operand, 1.0 / (n_global - 1), reduce=group is None)
    mm_var = torch.diagonal(all_reduce(cov, group))
    if penalty is None:
        penalty = cov.square().sum() - mm_var.square().sum()
    return penalty, mm_var, (cov, operand)


class _VICReg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, sim_coeff, std_coeff, cov_coeff, group, gram_form, matmul):
        world = 1 if group is None else dist.get_world_size(group)
        n_global, D = x.shape[0] * world, x.shape[1]
        (mean_x, var_x), (mean_y, var_y) = global_mean_var(x, group, n_global), global_mean_var(y, group, n_global)
        raise_if_not_finite(x=mean_x + var_x, y=mean_y + var_y)
        ones = torch.ones_like(mean_x)
        xc, yc, _ = standardize_pair(x, y, mean_x, ones, mean_y, ones)
        unbiased = n_global / (n_global - 1)
        var_x, var_y = var_x * unbiased, var_y * unbiased
        std_x, std_y = torch.sqrt(var_x + VARIANCE_EPS), torch.sqrt(var_y + VARIANCE_EPS)
        std_term = (F.relu(1 - std_x).mean() + F.relu(1 - std_y).mean()) / 2
        penalty_x, mm_var_x, saved_x = _covariance_penalty(xc, var_x, x.dtype, group, n_global, gram_form, matmul)
        penalty_y, mm_var_y, saved_y = _covariance_penalty(yc, var_y, y.dtype, group, n_global, gram_form, matmul)
        repr_loss = F.mse_loss(x.float(), y.float())
        loss = sim_coeff * repr_loss + std_coeff * std_term + cov_coeff * (penalty_x + penalty_y) / D

        ctx.save_for_backward(x, y, xc, yc, std_x, std_y, mm_var_x, mm_var_y, *saved_x, *saved_y)
        ctx.constants = (sim_coeff, std_coeff, cov_coeff, group, gram_form, n_global, world)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, xc, yc, std_x, std_y, mm_var_x, mm_var_y, *saved = ctx.saved_tensors
        sim_coeff, std_coeff, cov_coeff, group, gram_form, n_global, world = ctx.constants
        D = x.shape[1]
        grad_loss = grad_loss.float().reshape(1).contiguous()
        grads = []
        for zc, std, mm_var, (matrix, operand) in [(xc, std_x, mm_var_x, saved[:2]), (yc, std_y, mm_var_y, saved[2:])]:
            hinge = (std < 1).float() * std_coeff / (2 * D * (n_global - 1) * std)
            # The kernel scales d by 1 / N_global.
            d = (-(4 * cov_coeff / (D * (n_global - 1))) * mm_var - hinge) * n_global
            # 16-bit operands of float32 results, the float32 matrix scaled into float16's range
            # (matmul_operand) by a bound from the variances: |G| <= trace(G) = (N - 1) sum var,
            # |cov| <= max var.
            if gram_form:
                scaled, scale = matmul_operand(matrix, operand.dtype, (n_global - 1) * mm_var.sum())
                matrix_term = float32_matmul(scaled, operand)  # (this rank's rows of G) Xc
                alpha = 4 * cov_coeff / (D * (n_global - 1) ** 2)
            else:
                scaled, scale = matmul_operand(matrix, operand.dtype, mm_var.max())
                matrix_term = float32_matmul(operand, scaled)  # Xc (Xc.T Xc / (N - 1))
                alpha = 4 * cov_coeff / (D * (n_global - 1))
            grads.append(standardize_backward(matrix_term.contiguous(), zc, zc, d.contiguous(), None, alpha / scale,
                                              n_global, grad_loss, world, group, torch.float32))
        # The invariance term is this rank's own: no world-size scaling.
        invariance = (x.float() - y.float()) * (grad_loss * (2 * sim_coeff / x.numel()))
        no_grads = (None,) * 6  # coefficients, group, formulation, matmul
        return (grads[0] + invariance).to(x.dtype), (grads[1] - invariance).to(y.dtype), *no_grads


def _vicreg_reference(x, y, sim_coeff, std_coeff, cov_coeff, group, gram_form):
    """The same function in PyTorch ops differentiated by autograd (any dtype, any device),
    with the official autograd-aware all-gather of the batch."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(compute), y.to(compute)
    raise_if_not_finite(x=x.detach().sum(0), y=y.detach().sum(0))
    repr_loss = F.mse_loss(x, y)
    if group is not None:
        from torch.distributed.nn.functional import all_gather

        x, y = torch.cat(all_gather(x, group=group)), torch.cat(all_gather(y, group=group))
    N, D = x.shape
    std_term, penalty = 0.0, 0.0
    for z in (x, y):
        zc = z - z.mean(dim=0)
        var = zc.square().sum(0) / (N - 1)
        std_term = std_term + F.relu(1 - torch.sqrt(var + VARIANCE_EPS)).mean() / 2
        if gram_form:
            penalty = penalty + (zc @ zc.t()).square().sum() / (N - 1) ** 2 - var.square().sum()
        else:
            cov = zc.t() @ zc / (N - 1)
            penalty = penalty + cov.square().sum() - torch.diagonal(cov).square().sum()
    return sim_coeff * repr_loss + std_coeff * std_term + cov_coeff * penalty / D


def vicreg_loss(
    x: torch.Tensor, y: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
    cov_coeff: float = 1.0, group: ProcessGroup = None, formulation: str = "auto", matmul: str = "triton",
) -> torch.Tensor:
    """The VICReg loss of two (N_local, D) embedding batches.

    ``sim_coeff * mse(x, y)`` (this rank's batch, as the official code) ``+ std_coeff *``
    the mean hinge ``relu(1 - sqrt(var + 1e-4))`` over both views ``/ 2 + cov_coeff *`` the
    squared off-diagonal covariances ``/ D`` of both views, variance and covariance over
    the global batch (unbiased). ``formulation``: "gram", "cross" or "auto" (Gram when
    N_global < D); ``matmul``: the Gram form's matmuls, as in :func:`barlow_twins_loss`. Any
    float dtype (matmuls in it, statistics and reductions in float32).
    Returns a float32 scalar (float64 for float64 input).
    """
    group, _, gram_form = check_view_pair(x, y, group, formulation, names=("x", "y"))
    check_matmul(matmul)
    coefficients = float(sim_coeff), float(std_coeff), float(cov_coeff)
    backend = select_backend("vicreg_loss", x.device, {
        "triton": lambda: kernel_dtype_reason(x, y),
        "reference": lambda: None,
    })
    if backend == "reference":
        return _vicreg_reference(x, y, *coefficients, group, gram_form)
    return _VICReg.apply(x.contiguous(), y.contiguous(), *coefficients, group, gram_form, matmul)
