"""NeCo's patch-ordering loss (REFERENCE.md section 5) in plain PyTorch.

For similarity rows ``s`` (student) and ``t`` (teacher) of shape (R, n), each row is sorted
by a differentiable sorting network into ``P_s``, ``P_t`` (n x n), the teacher without
gradient, and

    loss = -mean_{rows, i} sum_j P_t[i, j] * log P_s[i, j]

Two versions:

- :func:`neco_loss_original`: the original composition, ``log`` without any guard: ``-inf`` or
  NaN as soon as an entry of ``P_s`` underflows to 0 (odd-even + cauchy at n = 49 reaches 0 at
  steepness 1000 in float32).
- :func:`neco_loss_rows_reference`: the guarded loss that fastssl computes (also the CPU
  fallback). ``log P_s`` is replaced by ``log(max(P_s, m))`` with ``m`` the smallest positive
  (subnormal) number of the dtype (2^-149 in float32). For every representable ``P_s > 0``
  the maximum is ``P_s`` itself, so each term, the loss and its gradient
  ``-P_t / P_s`` are *exactly* the original's wherever the original is finite (all
  ``P_s > 0``). Where ``P_s == 0`` the term becomes ``P_t * log(m)`` (finite; ``0`` when
  ``P_t == 0`` too, where the original has ``0 * -inf = NaN``) and the entry's gradient is
  0, the derivative of the clamp.
"""

from __future__ import annotations

import torch

from fastssl.reference.diffsort import soft_sort_reference


def smallest_positive(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _permutations(student_sim, teacher_sim, steepness_student, steepness_teacher, network, distribution,
                  art_lambda):
    if student_sim.dtype in (torch.float16, torch.bfloat16):
        student_sim, teacher_sim = student_sim.float(), teacher_sim.float()
    with torch.no_grad():
        _, P_t = soft_sort_reference(teacher_sim.detach(), steepness_teacher, network, distribution, art_lambda)
    _, P_s = soft_sort_reference(student_sim, steepness_student, network, distribution, art_lambda)
    return P_s, P_t


def neco_loss_original(student_sim, teacher_sim, steepness_student=100.0, steepness_teacher=100.0,
                       network="bitonic", distribution="cauchy", art_lambda=0.25):
    """The unfused original: two soft sorts, then ``-(P_t * log P_s).sum(-1).mean()``."""
    P_s, P_t = _permutations(student_sim, teacher_sim, steepness_student, steepness_teacher, network,
                             distribution, art_lambda)
    return -(P_t * torch.log(P_s)).sum(-1).mean()


def guarded_log(P: torch.Tensor) -> torch.Tensor:
    """``log(max(P, smallest positive number))``: the exact log of every positive entry."""
    return torch.log(P.clamp_min(smallest_positive(P.dtype)))


def neco_loss_rows_reference(student_sim, teacher_sim, steepness_student=100.0, steepness_teacher=100.0,
                             network="bitonic", distribution="cauchy", art_lambda=0.25):
    """Per-row guarded loss ``-(1/n) sum_{i,j} P_t log P_s`` of rows (..., n); float32 for
    half-precision rows (they are sorted in float32), else the rows' dtype."""
    P_s, P_t = _permutations(student_sim, teacher_sim, steepness_student, steepness_teacher, network,
                             distribution, art_lambda)
    return -(P_t * guarded_log(P_s)).sum((-2, -1)) / P_s.shape[-1]
