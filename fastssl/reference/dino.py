"""DINO / DINOv2 / iBOT losses in plain PyTorch (REFERENCE.md section 1).

- :class:`DINOLossOriginal`: the official DINO ``DINOLoss`` (facebookresearch/dino), the
  oracle and benchmark baseline of :class:`fastssl.nn.DINOLoss`.
- :func:`ibot_patch_loss_original`: DINOv2's ``iBOTPatchLoss.forward_masked``.
- :func:`koleo_loss_original`: DINOv2's ``KoLeoLoss.forward``.
- :func:`dino_cross_entropy_reference`: the general function the fused kernel computes,
  written with one log-softmax per student crop; the ``reference`` backend.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLossOriginal(nn.Module):
    """The official DINO loss: teacher centering and sharpening, all (2 * ncrops - 2) pairs
    of a teacher global crop with a different student crop, center EMA after the loss."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def ibot_patch_loss_original(student_masked, teacher_probs_masked, masks, student_temp=0.1, masks_weight=None):
    """DINOv2 ``iBOTPatchLoss.forward_masked``: rows are masked patches (n_masked, K),
    ``teacher_probs_masked`` the teacher's centered softmax (or Sinkhorn) targets, ``masks``
    (n_images, n_patches) bool. Each patch weighs 1 / (masked patches of its image); the sum
    is divided by the number of images (DINOv2's code; REFERENCE.md says n_global_crops)."""
    loss = torch.sum(teacher_probs_masked * F.log_softmax(student_masked / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = loss * masks_weight
    return -loss.sum() / masks.shape[0]


def koleo_loss_original(student_output, eps=1e-8):
    """DINOv2 ``KoLeoLoss.forward``: -mean log distance to the nearest neighbour, in float32
    (float64 for float64 rows)."""
    x = F.normalize(student_output.to(torch.promote_types(student_output.dtype, torch.float32)), eps=eps, p=2,
                    dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def dino_cross_entropy_reference(
    student, teacher, n_student_crops, n_teacher_crops, student_temp,
    teacher_temp=None, center=None, pair_weights=None, sample_weights=None,
):
    """The function of :func:`fastssl.ops.dino_cross_entropy` in plain PyTorch.

    ``loss = sum_b w_b sum_{i,v} P[i,v] * sum_k -q_i[b,k] * log_softmax(s_v[b] / student_temp)_k``
    with ``q_i = softmax((t_i - center) / teacher_temp)`` (or ``t_i`` itself when
    ``teacher_temp`` is None). Returns ``(loss, teacher_column_sum)``; the column sum of the
    raw teacher rows (for the center) is None for probability targets.
    """
    compute = torch.promote_types(student.dtype, torch.float32)
    B = student.shape[0] // n_student_crops
    log_p = F.log_softmax(student.to(compute) / student_temp, dim=-1).view(n_student_crops, B, -1)
    teacher = teacher.detach().to(compute)
    if teacher_temp is not None:
        shifted = teacher if center is None else teacher - center.to(compute).view(1, -1)
        q = F.softmax(shifted / teacher_temp, dim=-1)
        column_sum = teacher.sum(0)
    else:
        q, column_sum = teacher, None
    q = q.view(n_teacher_crops, B, -1)
    # ce[i, v, b] = -sum_k q[i, b, k] * log_p[v, b, k]
    ce = -torch.einsum("ibk,vbk->ivb", q, log_p)
    loss = torch.einsum("ivb,iv,b->", ce, pair_weights.to(compute), sample_weights.to(compute))
    return loss, column_sum
