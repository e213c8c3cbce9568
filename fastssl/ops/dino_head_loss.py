"""The DINO head's last layer fused with the loss: logits are never materialized.

``student_logits = student_features @ student_weight.T`` (and the same for the teacher with
its own, EMA, weight) would be (rows, K), e.g. 768 x 65536 floats (192 MiB in float32) for
DINO ViT-S, plus the same again for its gradient. Here K is processed in slices of
``chunk_size`` prototypes:

- forward: per slice, one matmul per network, then the fused loss kernel's per-chunk
  partials (``fastssl::dino_cross_entropy_partials``); the slice's logits are freed before
  the next. The partials of every slice are merged into the loss and O(rows) statistics.
- backward: per slice, the logits are recomputed, the loss kernel's backward gives the
  slice of dL/dlogits, and ``dW[slice] = G.T @ h``, ``dh += G @ W[slice]``.

Peak extra memory: one (rows, chunk_size) slice of logits per network and of G, whatever K.
Work: the matmuls of the unfused head once forward and twice backward, plus one recompute.
The weights arrive as tensors, so ``weight_g * weight_v / ||weight_v||`` (weight norm) is
differentiated by autograd outside this function.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastssl.backend import select_backend
from fastssl.ops.dino_loss import (
    Partials,
    _merge_partials,
    _optional_temp,
    backward_op,
    kernel_dtype_reason,
    partials_op,
    prepare_dino_inputs,
)
from fastssl.reference.dino import dino_cross_entropy_reference


def _slices(K: int, chunk_size: int):
    return [slice(start, min(start + chunk_size, K)) for start in range(0, K, chunk_size)]


def _logits(features, weight, columns):
    return features @ weight[columns].t()


class _DINOHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_features, student_weight, teacher_features, teacher_weight, center,
                pair_weights, sample_weights, n_student, n_teacher, student_temp, teacher_temp, chunk_size):
        parts = []
        for columns in _slices(student_weight.shape[0], chunk_size):
            parts.append(partials_op(
                _logits(student_features, student_weight, columns),
                _logits(teacher_features, teacher_weight, columns),
                None if center is None else center[columns],
                n_student, n_teacher, student_temp, teacher_temp,
            ))
        merged = Partials(*[torch.cat(pieces, dim=-1) for pieces in zip(*parts)])
        loss, student_stats, teacher_stats = _merge_partials(
            merged, student_temp, _optional_temp(teacher_temp), pair_weights, sample_weights)
        ctx.save_for_backward(student_features, student_weight, teacher_features, teacher_weight,
                              center, student_stats, teacher_stats, pair_weights, sample_weights)
        ctx.constants = (n_student, n_teacher, student_temp, teacher_temp, chunk_size)
        ctx.mark_non_differentiable(merged.column_sum)
        return loss, merged.column_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_column_sum):
        (student_features, student_weight, teacher_features, teacher_weight, center,
         student_stats, teacher_stats, pair_weights, sample_weights) = ctx.saved_tensors
        n_student, n_teacher, student_temp, teacher_temp, chunk_size = ctx.constants
        grad_features = torch.zeros_like(student_features, dtype=torch.float32)
        grad_weight = torch.empty_like(student_weight)
        for columns in _slices(student_weight.shape[0], chunk_size):
            grad_logits = backward_op(
                grad_loss,
                _logits(student_features, student_weight, columns),
                _logits(teacher_features, teacher_weight, columns),
                None if center is None else center[columns],
                student_stats, teacher_stats, pair_weights, sample_weights,
                n_student, n_teacher, student_temp, teacher_temp,
            )
            grad_weight[columns] = grad_logits.t() @ student_features
            grad_features += (grad_logits @ student_weight[columns]).float()
        return (grad_features.to(student_features.dtype), grad_weight,
                None, None, None, None, None, None, None, None, None, None)


def dino_head_cross_entropy(
    student_features: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_features: torch.Tensor,
    teacher_weight: torch.Tensor,
    n_student_crops: int,
    n_teacher_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    center: Optional[torch.Tensor] = None,
    pair_weights: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fastssl.ops.dino_cross_entropy` of ``student_features @ student_weight.T``
    against ``teacher_features @ teacher_weight.T``, without materializing either.

    Args:
        student_features: (S * B, D) input of the student head's last layer (DINO: the
            l2-normalized bottleneck, D = 256); receives a gradient.
        student_weight: (K, D) effective last-layer weight (``DINOHead.last_layer.weight``);
            receives a gradient.
        teacher_features, teacher_weight: (T * B, D) and (K, D), the teacher's; no gradient.
        chunk_size: prototypes per slice; peak extra memory is about
            ``(S + T) * B * chunk_size`` elements, independent of K.
        The other arguments are those of :func:`fastssl.ops.dino_cross_entropy` (teacher
        targets are always logits here).
    Returns:
        ``(loss, teacher_column_sum)`` as :func:`fastssl.ops.dino_cross_entropy`.
    """
    for name, features, weight in (("student", student_features, student_weight),
                                   ("teacher", teacher_features, teacher_weight)):
        if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
            raise ValueError(f"{name}_features (rows, D) and {name}_weight (K, D) must share D, got "
                             f"{tuple(features.shape)} and {tuple(weight.shape)}")
    if student_weight.shape != teacher_weight.shape:
        raise ValueError(f"student_weight and teacher_weight must have one shape, got "
                         f"{tuple(student_weight.shape)} and {tuple(teacher_weight.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    K = student_weight.shape[0]
    # The checks are about the logits' shapes: (rows, K) views of one element stand in.
    logits_like = student_features.new_empty((1, 1)).expand(student_features.shape[0], K)
    teacher_like = teacher_features.new_empty((1, 1)).expand(teacher_features.shape[0], K)
    inputs = prepare_dino_inputs(logits_like, teacher_like, n_student_crops, n_teacher_crops,
                                 student_temp, teacher_temp, center, pair_weights, sample_weights,
                                 require_teacher_temp=True)
    backend = select_backend("dino_head_cross_entropy", student_features.device, {
        "triton": lambda: kernel_dtype_reason(student_features, teacher_features),
        "reference": lambda: None,
    })
    teacher_features, teacher_weight = teacher_features.detach(), teacher_weight.detach()
    if backend == "reference":
        loss, column_sum = dino_cross_entropy_reference(
            student_features @ student_weight.t(), teacher_features @ teacher_weight.t(),
            inputs.n_student, inputs.n_teacher, inputs.student_temp, inputs.teacher_temp,
            inputs.center, inputs.pair_weights, inputs.sample_weights,
        )
        return loss, column_sum.detach()
    return _DINOHeadCrossEntropy.apply(
        student_features, student_weight, teacher_features, teacher_weight, inputs.center,
        inputs.pair_weights, inputs.sample_weights, inputs.n_student, inputs.n_teacher,
        inputs.student_temp, inputs.teacher_temp, chunk_size,
    )
