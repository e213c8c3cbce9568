"""DINO / DINOv2 / iBOT modules: losses with their centers, KoLeo, the projection head."""

from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastssl._checks import check_float_tensor, check_positive_float, check_positive_int
from fastssl.distributed import ProcessGroup, resolve_group
from fastssl.ops.dino_head_loss import dino_head_cross_entropy
from fastssl.ops.dino_loss import dino_cross_entropy
from fastssl.ops.sinkhorn import sinkhorn_knopp
from fastssl.reference.dino import koleo_loss_original

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stack_crops(name: str, value: Crops) -> torch.Tensor:
    """Crops given as one (crops * B, K) tensor or a list of (B, K) tensors, as one tensor."""
    if isinstance(value, torch.Tensor):
        return value
    crops = list(value)
    if not crops:
        raise ValueError(f"{name} is an empty list")
    for i, crop in enumerate(crops):
        check_float_tensor(f"{name}[{i}]", crop, min_dim=2)
    if len({tuple(c.shape) for c in crops}) != 1:
        raise ValueError(f"{name} crops must share one shape, got {[tuple(c.shape) for c in crops]}")
    return torch.cat(crops)


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                                 epochs: int) -> np.ndarray:
    """DINO's per-epoch teacher temperature: linear from ``warmup_teacher_temp`` over the
    warm-up epochs (both ends included), then ``teacher_temp``."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(epochs - warmup_epochs) * teacher_temp))


class _TeacherTargets:
    """The teacher side shared by :class:`DINOLoss` and :class:`IBOTPatchLoss`: the center
    buffer (named ``center`` as in the official checkpoints) and its EMA,
    ``c <- m c + (1 - m) sum_rows(t) / (rows * world)``, synchronous (the official DINO) or
    asynchronous (DINOv2: the all-reduce is launched in one step and applied at the start of
    the next; only the (K,) row sum is reduced), plus DINOv2's teacher-target methods."""

    def _init_center(self, shape: tuple, momentum: float, async_update: bool, group: ProcessGroup) -> None:
        self.center_momentum = momentum
        self.async_center = async_update
        self.group = group
        self.register_buffer("center", torch.zeros(shape))
        self._pending_center = None  # (row sum, rows, all-reduce handle or None)

    @torch.no_grad()
    def _start_center_update(self, row_sum: torch.Tensor, rows: int) -> None:
        group = resolve_group(self.group)
        row_sum = row_sum.float()
        work = None
        if group is not None:
            work = dist.all_reduce(row_sum, group=group, async_op=self.async_center)
        self._pending_center = (row_sum, rows * (1 if group is None else dist.get_world_size(group)), work)
        if not self.async_center:
            self.apply_center_update()

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending (asynchronous) center update in; call before saving a checkpoint."""
        if self._pending_center is None:
            return
        row_sum, rows, work = self._pending_center
        if work is not None and self.async_center:
            work.wait()
        batch_center = (row_sum / rows).view(self.center.shape).to(self.center.device)
        # A new tensor, not an in-place update: the current center may be saved for the
        # backward of this step's loss.
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self._pending_center = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        """``softmax((teacher_output - center) / teacher_temp)``, after applying a pending
        center update (DINOv2)."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor=None, n_iterations=3):
        """DINOv2's Sinkhorn-Knopp targets on :func:`fastssl.ops.sinkhorn_knopp`. iBOT passes
        the global count of masked patches as B; the result does not depend on it (see
        fastssl.reference.sinkhorn), so it is accepted and unused."""
        return sinkhorn_knopp(teacher_output, eps=teacher_temp, n_iters=n_iterations, group=self.group)


class DINOLoss(_TeacherTargets, nn.Module):
    """The DINO loss (facebookresearch/dino ``DINOLoss``) on the fused kernel.

    Same constructor and ``forward(student_output, teacher_output, epoch)`` as the official
    module: student_output (ncrops * B, K), teacher_output (2 * B, K) (or lists of per-crop
    (B, K) tensors), teacher temperature warmed up linearly over
    ``warmup_teacher_temp_epochs``, center EMA updated after the loss. Returns the scalar
    float32 loss. Beyond the original:

    - ``async_center=True`` launches the center's all-reduce and applies it at the next call
      (DINOv2); call ``apply_center_update()`` before saving a checkpoint.
    - ``group``: process group for the center (default: the default group when
      torch.distributed is initialized, as the original).
    - DINOv2's ``softmax_center_teacher``, ``sinkhorn_knopp_teacher`` and ``update_center``.
    - No (B, K) log-softmax per crop pair is kept: the fused op keeps O(rows) statistics.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, *, async_center=False, group=None):
        super().__init__()
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.ncrops = check_positive_int("ncrops", ncrops)
        if self.ncrops < 2:
            raise ValueError(f"ncrops must be >= 2 (the two global crops), got {ncrops}")
        self.student_temp = check_positive_float("student_temp", student_temp)
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(f"warmup_teacher_temp_epochs must be in [0, nepochs={nepochs}], "
                             f"got {warmup_teacher_temp_epochs}")
        self.teacher_temp_schedule = teacher_temperature_schedule(
            check_positive_float("warmup_teacher_temp", warmup_teacher_temp),
            check_positive_float("teacher_temp", teacher_temp), warmup_teacher_temp_epochs, nepochs)
        self._init_center((1, out_dim), center_momentum, async_center, group)

    def teacher_temperature(self, epoch: int) -> float:
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(f"epoch {epoch} is outside the teacher temperature schedule of "
                             f"{len(self.teacher_temp_schedule)} epochs (nepochs)")
        return float(self.teacher_temp_schedule[epoch])

    def forward(self, student_output: Crops, teacher_output: Crops, epoch: int) -> torch.Tensor:
        student = _stack_crops("student_output", student_output)
        teacher = _stack_crops("teacher_output", teacher_output)
        for name, value in (("student_output", student), ("teacher_output", teacher)):
            check_float_tensor(name, value, min_dim=2)
            if value.dim() != 2 or value.shape[1] != self.out_dim:
                raise ValueError(f"{name} must be (rows, out_dim={self.out_dim}), got {tuple(value.shape)}")
        return self._loss_and_center_update(
            dino_cross_entropy, (student, teacher), teacher.shape[0], self.teacher_temperature(epoch))

    def _loss_and_center_update(self, loss_fn, tensors, teacher_rows: int, teacher_temp: float):
        """``loss_fn(*tensors, ...)`` with the current center, then the center update."""
        self.apply_center_update()
        loss, row_sum = loss_fn(
            *tensors, n_student_crops=self.ncrops, n_teacher_crops=2,
            student_temp=self.student_temp, teacher_temp=teacher_temp, center=self.center,
        )
        self._start_center_update(row_sum, teacher_rows)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output) -> None:
        """DINOv2's center update from (rows, K) teacher logits, for use with
        ``softmax_center_teacher``; ``forward`` updates the center by itself."""
        self._start_center_update(teacher_output.float().sum(0), teacher_output.shape[0])


class DINOHeadLoss(DINOLoss):
    """:class:`DINOLoss` with the heads' last layer fused into it: the (crops * B, K) logits
    of neither network are ever materialized (see :func:`fastssl.ops.dino_head_cross_entropy`).

    Same constructor as :class:`DINOLoss` plus ``chunk_size`` (prototypes per slice).
    ``forward(student_features, student_last_layer, teacher_features, teacher_last_layer,
    epoch)``: features (ncrops * B, D) and (2 * B, D) are the inputs of the last layers
    (``DINOHead.bottleneck(x)``), last layers are ``DINOHead.last_layer`` modules (or
    (K, D) weight tensors). Equal to ``DINOLoss(head(x_s), head_t(x_t), epoch)``; gradients
    reach the student features and the student last layer (``weight_v``, and ``weight_g``
    when it is trained).
    """

    def __init__(self, *args, chunk_size: int = 8192, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)

    def forward(self, student_features, student_last_layer, teacher_features, teacher_last_layer, epoch):
        weights = []
        for name, layer in (("student_last_layer", student_last_layer), ("teacher_last_layer", teacher_last_layer)):
            weight = layer if isinstance(layer, torch.Tensor) else getattr(layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape[0] != self.out_dim:
                raise ValueError(f"{name} must be a layer or weight with out_dim={self.out_dim} rows")
            weights.append(weight)
        return self._loss_and_center_update(
            functools.partial(dino_head_cross_entropy, chunk_size=self.chunk_size),
            (student_features, weights[0], teacher_features, weights[1]),
            teacher_features.shape[0], self.teacher_temperature(epoch))


class IBOTPatchLoss(_TeacherTargets, nn.Module):
    """DINOv2's ``iBOTPatchLoss`` on the fused kernel: masked-patch rows, each weighted by
    1 / (masked patches of its image), summed and divided by the number of images.

    DINOv2-compatible methods: ``softmax_center_teacher(t, teacher_temp)``,
    ``sinkhorn_knopp_teacher(t, teacher_temp, n_masked_patches_tensor, n_iterations=3)``,
    ``update_center(t)``,
    ``apply_center_update()`` and ``forward_masked(student_masked, teacher_masked,
    student_masks_flat, n_masked_patches=None, masks_weight=None)`` with teacher
    probabilities. Fused path: ``forward_masked(..., teacher_temp=T)`` takes the teacher's
    raw masked logits and centers, sharpens and updates the center in the kernel's pass,
    never materializing the (n_masked, K) probabilities. Its center update averages the real
    masked rows; DINOv2's training loop passes ``update_center`` a (1, upperbound, K)
    tensor sliced on its first dimension, so its center also averages the padding rows.
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9, *, async_center=True, group=None):
        super().__init__()
        self.patch_out_dim = check_positive_int("patch_out_dim", patch_out_dim)
        self.student_temp = check_positive_float("student_temp", student_temp)
        self._init_center((1, 1, patch_out_dim), center_momentum, async_center, group)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        tokens = teacher_patch_tokens.reshape(-1, teacher_patch_tokens.shape[-2], self.patch_out_dim) \
            if teacher_patch_tokens.dim() == 3 else teacher_patch_tokens.unsqueeze(0)
        # DINOv2: sum over images of the per-image mean over tokens.
        self._start_center_update(tokens.float().mean(1).sum(0), tokens.shape[0])

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None, teacher_temp=None):
        student = student_patch_tokens_masked
        teacher = teacher_patch_tokens_masked
        if not isinstance(student_masks_flat, torch.Tensor) or student_masks_flat.dtype != torch.bool \
                or student_masks_flat.dim() != 2:
            raise ValueError("student_masks_flat must be a 2-D bool tensor (images, patches)")
        if masks_weight is None:
            masks_weight = (1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1) \
                .expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            student, teacher = student[:n_masked_patches], teacher[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        if masks_weight.shape != (student.shape[0],):
            raise ValueError(f"masks_weight must hold one weight per masked patch ({student.shape[0]}), "
                             f"got shape {tuple(masks_weight.shape)}")
        n_images = student_masks_flat.shape[0]
        if teacher_temp is not None:
            self.apply_center_update()
        loss, row_sum = dino_cross_entropy(
            student, teacher, n_student_crops=1, n_teacher_crops=1, student_temp=self.student_temp,
            teacher_temp=teacher_temp, center=self.center if teacher_temp is not None else None,
            pair_weights=torch.ones(1, 1, device=student.device),
            sample_weights=masks_weight.float() / n_images,
        )
        if teacher_temp is not None:
            self._start_center_update(row_sum, teacher.shape[0])
        return loss


class KoLeoLoss(nn.Module):
    """DINOv2's KoLeo regularizer: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` on l2-normalized
    rows, in float32 (float64 for float64 rows), per process. ``forward(student_output (B, D),
    eps=1e-8)``."""

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        check_float_tensor("student_output", student_output, min_dim=2)
        if student_output.dim() != 2 or student_output.shape[0] < 2:
            raise ValueError(f"student_output must be (B >= 2, D), got {tuple(student_output.shape)}")
        with torch.autocast(student_output.device.type, enabled=False):
            return koleo_loss_original(student_output, eps)


class WeightNormLinear(nn.Module):
    """``Linear(in, out, bias=False)`` with weight ``g * v / ||v||`` (row norms), state-dict
    compatible with ``nn.utils.weight_norm`` (``weight_g`` (out, 1), ``weight_v`` (out, in))."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """The DINO projection head: MLP in_dim -> hidden -> ... -> bottleneck (GELU, optional
    BatchNorm), l2-normalization, weight-normalized ``Linear(bottleneck, out_dim)`` whose
    ``weight_g`` is fixed to 1 when ``norm_last_layer``. Constructor and state dict as in
    facebookresearch/dino. (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The l2-normalized input of the last layer, (B, bottleneck_dim): what
        :class:`DINOHeadLoss` takes instead of the logits."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
