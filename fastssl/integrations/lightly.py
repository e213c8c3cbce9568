"""Drop-in replacements for lightly's losses (``lightly.loss``), on fastssl's ops.

Add one line to an existing lightly training script, before it builds its losses::

    import fastssl.integrations.lightly; fastssl.integrations.lightly.patch()

or, where the losses exist already (a LightningModule holding them as attributes, a loss
loaded from a checkpoint)::

    fastssl.integrations.lightly.patch(model=lightning_module)    # its lightly losses become fastssl's
    fastssl.integrations.lightly.unpatch(model=lightning_module)  # and lightly's again

which swaps the class of each loss in place, keeping its buffers (DINO's center, iBOT's
``Center``) and attributes; a loss fastssl cannot serve (``KoLeoLoss(p=1)``, an
``NTXentLoss`` memory bank, a center mode other than ``'mean'``, ...) raises ``ValueError``
naming it, before anything is swapped.

Tested with (``TESTED_VERSIONS``; on another version patch() still checks every name it
replaces and its signature, and raises
:class:`~fastssl.integrations.UpstreamMismatch` naming what changed, patching
nothing):

======== ===============
lightly  1.5.x, 1.6.x
======== ===============

After ``patch()``, ``lightly.loss.DINOLoss``, ``SwaVLoss``, ``BarlowTwinsLoss``,
``VICRegLoss``, ``IBOTPatchLoss``, ``KoLeoLoss`` (also under their defining submodules, and
wherever a module imported them by name) and ``lightly.loss.swav_loss.sinkhorn`` are the
classes and function below; ``unpatch()`` restores lightly's. ``with patch(): ...`` unpatches
on leaving the block. Patch before defining subclasses of these losses: lightly's
``SwaVLoss``, ``BarlowTwinsLoss`` and ``VICRegLoss`` call ``super(ClassName, self)``, which
finds fastssl's class while patched, so their originals (and subclasses of them defined
before patching) cannot be constructed until ``unpatch()``.

Each class keeps lightly's constructor (argument names, order, defaults), forward signature,
public methods, attributes, buffers and state-dict keys, so checkpoints load both ways. The
values are lightly's up to rounding; what differs is listed in each class's docstring, and
configurations that cannot be matched raise ``NotImplementedError`` naming the cause.
Common to all: the losses compute in at least float32 (16-bit inputs give a float32 loss),
gradients never reach a DINO or iBOT teacher (lightly's would; a teacher that requires grad
raises), and non-finite inputs raise ``ValueError`` where lightly returns NaN.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import lightly.loss as lightly_loss
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.modules.center import CENTER_MODE_TO_FUNCTION, Center, center_momentum
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import Tensor, nn
from torch.nn import PairwiseDistance

import fastssl.nn
from fastssl._checks import check_float_tensor, check_positive_float, check_positive_int
from fastssl.distributed import process_group_for
from fastssl.integrations._patching import Patch, Swap, Upstream, swap_modules
from fastssl.ops import barlow_twins_loss, dino_cross_entropy, info_nce, sinkhorn_knopp, vicreg_loss
from fastssl.ops.vicreg import VARIANCE_EPS

BATCH_NORM_EPS = 1e-5  # F.batch_norm's default, which lightly's BarlowTwinsLoss standardizes with

Views = Union[Sequence[Tensor], Tensor]

TESTED_VERSIONS = ("1.5.*", "1.6.*")


# ----------------------------------------------------------------------------- shared glue


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _check_no_teacher_gradient(name: str, teacher: Tensor) -> None:
    if torch.is_grad_enabled() and teacher.requires_grad:
        raise ValueError(
            f"{name} requires grad: lightly would backpropagate into the teacher, fastssl's fused loss "
            "does not. Compute the teacher under torch.no_grad() (or detach it), as DINO and iBOT do"
        )


def _pairs_off_the_diagonal(rows: int, columns: int, device) -> Tensor:
    """Weight one for every (teacher view i, student view v) pair with i != v, zero for i == v
    (lightly's ``fill_diagonal_(0)``), so the loss is divided by lightly's count exactly."""
    pairs = torch.ones(rows, columns, device=device)
    return pairs.fill_diagonal_(0)


@torch.no_grad()
def _batch_center(column_sum: Tensor, rows: int, shape) -> Tensor:
    """lightly's ``center_mean`` from the op's column sum: the mean of this process's teacher
    rows, averaged over processes when torch.distributed is initialized."""
    batch_center = (column_sum / rows).view(shape)
    if _distributed():
        dist.all_reduce(batch_center)
        batch_center = batch_center / dist.get_world_size()
    return batch_center


def _teacher_temperature(value) -> float:
    # lightly divides by torch.tensor(value), a float32 scalar (also for float64 logits), or
    # by an entry of its float32 schedule: the op gets that value.
    return torch.as_tensor(value).item()


def _stack_views(name: str, views: Views) -> Tensor:
    """lightly's ``torch.stack(views)``: one (batch_size, dim) tensor per view -> (views, B, dim)."""
    views = list(views)
    if not views:
        raise ValueError(f"{name} is empty: give one (batch_size, output_dim) tensor per view")
    for i, view in enumerate(views):
        check_float_tensor(f"{name}[{i}]", view, min_dim=2)
    shapes = [tuple(view.shape) for view in views]
    if views[0].dim() != 2 or len(set(shapes)) != 1:
        raise ValueError(f"{name} must hold (batch_size, output_dim) tensors of one shape, got {shapes}")
    return torch.stack(views)


# ----------------------------------------------------------------------------- DINO and iBOT


class DINOLoss(nn.Module):
    """Replaces ``lightly.loss.DINOLoss``; runs :func:`fastssl.ops.dino_cross_entropy` (every
    teacher-student view pair in one fused pass, no per-pair (B, D) tensors).

    ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)``: teacher FIRST, each a
    list of (B, output_dim) tensors, one per view (T teacher and S student views). The loss is
    the cross-entropy of ``softmax((t_i - center) / teacher_temp)`` against
    ``log_softmax(s_v / student_temp)`` summed over pairs i != v (view index), divided by
    ``(T * S - min(T, S)) * B``; a 0-dim tensor. Then the (1, 1, output_dim) ``center`` buffer
    moves towards the mean teacher row (averaged over processes when torch.distributed is
    initialized), as lightly's does. The teacher temperature is ``teacher_temp`` if given, else
    lightly's warmup schedule at ``epoch`` if given, else the constructor's.

    Differs from lightly: no gradient reaches ``teacher_out`` (a teacher that requires grad
    raises ``ValueError``; lightly's teacher is frozen or computed under ``no_grad`` anyway),
    and 16-bit logits give a float32 loss.
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
    ) -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self._center_fn = _mean_center_function(center_mode)
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(
            start=warmup_teacher_temp, end=teacher_temp, steps=warmup_teacher_temp_epochs
        )

    def forward(
        self,
        teacher_out: Views,
        student_out: Views,
        teacher_temp: Optional[float] = None,
        epoch: Optional[int] = None,
    ) -> Tensor:
        teacher = _stack_views("teacher_out", teacher_out)
        student = _stack_views("student_out", student_out)
        _check_no_teacher_gradient("teacher_out", teacher)
        (n_teacher, batch_size, output_dim), n_student = teacher.shape, student.shape[0]
        if student.shape[1:] != teacher.shape[1:] or output_dim != self.center.shape[-1]:
            raise ValueError(f"teacher_out and student_out views must be (batch_size, output_dim="
                             f"{self.center.shape[-1]}), got {tuple(teacher.shape[1:])} and {tuple(student.shape[1:])}")
        n_terms = n_teacher * n_student - min(n_teacher, n_student)
        if n_terms == 0:
            raise ValueError(
                "DINOLoss requires at least two views in total (the diagonal matching the same view index is "
                f"excluded), but got {n_teacher} teacher view(s) and {n_student} student view(s), which leaves "
                "no cross-view terms to compute the loss from."
            )
        loss, column_sum = dino_cross_entropy(
            student.flatten(0, 1), teacher.flatten(0, 1), center=self.center,
            n_student_crops=n_student, n_teacher_crops=n_teacher, student_temp=self.student_temp,
            teacher_temp=self._teacher_temperature(teacher_temp, epoch),
            pair_weights=_pairs_off_the_diagonal(n_teacher, n_student, student.device),
            sample_weights=torch.ones(batch_size, device=student.device),
        )
        self.center.data = center_momentum(
            center=self.center, batch_center=_batch_center(column_sum, n_teacher * batch_size, self.center.shape),
            momentum=self.center_momentum,
        )
        return loss / (n_terms * batch_size)

    def _teacher_temperature(self, teacher_temp: Optional[float], epoch: Optional[int]) -> float:
        if teacher_temp is not None:
            return _teacher_temperature(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return _teacher_temperature(self.teacher_temp_schedule[epoch])
        return _teacher_temperature(self.teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """lightly's moving-average update from (views, batch_size, output_dim) teacher logits
        (``forward`` updates the center by itself)."""
        batch_center = self._center_fn(x=teacher_out, dim=(0, 1))
        self.center.data = center_momentum(center=self.center, batch_center=batch_center,
                                           momentum=self.center_momentum)


def _mean_center_function(center_mode: str):
    """lightly's center function for ``center_mode`` (its error for unknown modes); the fused
    path computes the mean center, so any other mode lightly may add is refused."""
    if center_mode not in CENTER_MODE_TO_FUNCTION:
        raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are {sorted(CENTER_MODE_TO_FUNCTION.keys())}.")
    if center_mode != "mean":
        raise NotImplementedError(f"fastssl's losses compute the 'mean' center only, got center_mode={center_mode!r}")
    return CENTER_MODE_TO_FUNCTION[center_mode]


class IBOTPatchLoss(nn.Module):
    """Replaces ``lightly.loss.IBOTPatchLoss``; runs :func:`fastssl.ops.dino_cross_entropy`
    with one weight per masked patch.

    ``forward(teacher_out, student_out, mask, teacher_temp=None)``: teacher and student
    (N, output_dim) logits of the N masked patches, ``mask`` (B, H, W) bool with exactly N
    entries set (patches in row-major mask order). Each patch's cross-entropy of
    ``softmax((t - center) / teacher_temp)`` against ``log_softmax(s / student_temp)`` is
    weighted by 1 / (masked patches of its image), summed and divided by B; a 0-dim tensor.
    Then ``center`` (lightly's ``Center`` module, a (1, output_dim) buffer: state-dict key
    ``center.center``) moves towards the mean teacher row, averaged over processes when
    torch.distributed is initialized.

    Differs from lightly: no gradient reaches ``teacher_out`` (a teacher that requires grad
    raises ``ValueError``), 16-bit logits give a float32 loss, and N = 0 raises (lightly
    returns 0 and turns its center into NaN).
    """

    def __init__(
        self,
        output_dim: int = 65536,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_mode: str = "mean",
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        _mean_center_function(center_mode)
        self.center = Center(size=(1, output_dim), mode=center_mode, momentum=center_momentum)

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor,
                teacher_temp: Optional[float] = None) -> Tensor:
        self._check_inputs(teacher_out, student_out, mask)
        # lightly's weights: 1 / (masked patches of the image) for each masked patch.
        num_masked_per_image = mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
        weight = (1.0 / num_masked_per_image).expand_as(mask)[mask]
        loss, column_sum = dino_cross_entropy(
            student_out, teacher_out, center=self.center.value, n_student_crops=1, n_teacher_crops=1,
            student_temp=self.student_temp,
            teacher_temp=_teacher_temperature(teacher_temp if teacher_temp is not None else self.teacher_temp),
            pair_weights=torch.ones(1, 1, device=student_out.device), sample_weights=weight,
        )
        batch_center = _batch_center(column_sum, teacher_out.shape[0], self.center.size)
        self.center.center = center_momentum(center=self.center.value, batch_center=batch_center,
                                             momentum=self.center.momentum)
        return loss / mask.shape[0]

    def _check_inputs(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor) -> None:
        check_float_tensor("teacher_out", teacher_out, min_dim=2)
        check_float_tensor("student_out", student_out, min_dim=2)
        output_dim = self.center.size[-1]
        if teacher_out.dim() != 2 or teacher_out.shape != student_out.shape or teacher_out.shape[1] != output_dim:
            raise ValueError(f"teacher_out and student_out must be (masked patches, output_dim={output_dim}), got "
                             f"{tuple(teacher_out.shape)} and {tuple(student_out.shape)}")
        _check_no_teacher_gradient("teacher_out", teacher_out)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
            raise ValueError("mask must be a (batch_size, height, width) bool tensor")
        masked = int(mask.sum())
        if masked != teacher_out.shape[0]:
            raise ValueError(f"mask sets {masked} patches but teacher_out and student_out hold "
                             f"{teacher_out.shape[0]} rows: give the logits of exactly the masked patches")


class KoLeoLoss(fastssl.nn.KoLeoLoss):
    """Replaces ``lightly.loss.KoLeoLoss``; runs :class:`fastssl.nn.KoLeoLoss`.

    ``forward(x)``: x (B >= 2, D) -> ``-mean_i log(||x_i - x_nn(i)||_2 + eps)`` over the
    l2-normalized rows, nn(i) the nearest other row; a 0-dim tensor.

    Differs from lightly: computed in at least float32 as DINOv2 does, also under autocast
    (16-bit input gives a float32 loss), B = 1 raises, and ``p`` other than 2 raises
    ``NotImplementedError`` (the nearest neighbour is measured in the Euclidean norm only).
    """

    def __init__(self, p: float = 2, eps: float = 1e-8):
        super().__init__()
        if p != 2:
            raise NotImplementedError(f"fastssl's KoLeoLoss measures Euclidean distances (p=2), got p={p}")
        self.p = p
        self.eps = eps
        # lightly's attribute, kept for code that reads it; the distance is computed underneath.
        self.pairwise_distance = PairwiseDistance(p=p, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x, eps=self.eps)


# ----------------------------------------------------------------------------- SwaV


@torch.no_grad()
def sinkhorn(out: Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False) -> Tensor:
    """Replaces ``lightly.loss.swav_loss.sinkhorn``; runs :func:`fastssl.ops.sinkhorn_knopp`.

    ``out`` (B, K) scores -> Q (B, K) in ``out``'s dtype, each row summing to one. With
    ``gather_distributed`` and torch.distributed initialized, the prototype normalizers are
    reduced over all processes (B is the global batch), else each process computes alone.

    Differs from lightly: computed in the log domain in float32 (float64 stays float64), so it
    stays finite where lightly's ``exp(out / epsilon)`` overflows to NaN (the same function
    wherever lightly's is finite); NaN or infinite scores raise ``ValueError``; ``iterations``
    must be >= 1 (lightly's 0 returns unbalanced scores).
    """
    check_float_tensor("out", out, min_dim=2)
    if out.dim() != 2:
        raise ValueError(f"out must be (batch_size, n_prototypes), got {tuple(out.shape)}")
    return _codes(out, iterations, epsilon, gather_distributed).to(out.dtype)


def _codes(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool) -> Tensor:
    return sinkhorn_knopp(scores, eps=check_positive_float("epsilon", epsilon),
                          n_iters=check_positive_int("iterations", iterations),
                          group=process_group_for(gather_distributed))


class SwaVLoss(nn.Module):
    """Replaces ``lightly.loss.SwaVLoss``; runs :func:`fastssl.ops.sinkhorn_knopp` for the
    codes and :func:`fastssl.ops.dino_cross_entropy` (codes as probability targets) for every
    crop pair in one fused pass.

    ``forward(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)``: lists of
    (B, K) prototype scores, H >= 1 high- and L low-resolution crops (H + L >= 2); optional
    ``queue_outputs``, one (Q, K) tensor per high-resolution crop, scores of queued features
    that join the Sinkhorn problem (their codes are dropped). For each high-resolution crop i,
    codes ``q_i = sinkhorn(scores_i)`` (no gradient); the loss is the mean over i of the mean
    over every other crop v of ``-mean_b sum_k q_i log_softmax(scores_v / temperature)``, a
    tensor of shape (1,) as lightly's. ``subloss(z, q)`` is one such term.

    Differs from lightly: see :func:`sinkhorn`; 16-bit scores give a float32 loss.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
    ):
        super().__init__()
        if sinkhorn_gather_distributed and not dist.is_available():
            raise ValueError(
                "sinkhorn_gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support."
            )
        self.temperature = check_positive_float("temperature", temperature)
        self.sinkhorn_iterations = check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
        self.sinkhorn_epsilon = check_positive_float("sinkhorn_epsilon", sinkhorn_epsilon)
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed

    def subloss(self, z: Tensor, q: Tensor) -> Tensor:
        """Cross-entropy of codes q (B, K) against predictions z (B, K), averaged over B."""
        loss, _ = dino_cross_entropy(
            z, q, n_student_crops=1, n_teacher_crops=1, student_temp=self.temperature,
            pair_weights=torch.ones(1, 1, device=z.device), sample_weights=torch.ones(z.shape[0], device=z.device),
        )
        return loss / z.shape[0]

    def forward(
        self,
        high_resolution_outputs: list[Tensor],
        low_resolution_outputs: list[Tensor],
        queue_outputs: Optional[list[Tensor]] = None,
    ) -> Tensor:
        crops = self._check_crops(high_resolution_outputs, low_resolution_outputs, queue_outputs)
        n_high, n_crops = len(high_resolution_outputs), len(crops)
        batch_size = crops[0].shape[0]
        codes = [self._crop_codes(high_resolution_outputs[i], None if queue_outputs is None else queue_outputs[i])
                 for i in range(n_high)]
        # Codes of high-resolution crop i against every crop v != i.
        loss, _ = dino_cross_entropy(
            torch.cat(crops), torch.cat(codes), n_student_crops=n_crops, n_teacher_crops=n_high,
            student_temp=self.temperature, pair_weights=_pairs_off_the_diagonal(n_high, n_crops, crops[0].device),
            sample_weights=torch.ones(batch_size, device=crops[0].device),
        )
        return (loss / (batch_size * (n_crops - 1) * n_high)).reshape(1)

    @torch.no_grad()
    def _crop_codes(self, scores: Tensor, queue_scores: Optional[Tensor]) -> Tensor:
        """The crop's codes, the queue's scores (if any) joining the Sinkhorn problem."""
        problem = scores.detach() if queue_scores is None else torch.cat((scores.detach(), queue_scores.detach()))
        q = _codes(problem, self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed)
        return q[: scores.shape[0]]

    @staticmethod
    def _check_crops(high, low, queue) -> list[Tensor]:
        crops = [*high, *low]
        if not high or len(crops) < 2:
            raise ValueError(f"SwaVLoss needs at least one high-resolution crop and two crops in all, got "
                             f"{len(high)} high- and {len(low)} low-resolution crops")
        for i, crop in enumerate(crops):
            check_float_tensor(f"crop {i}", crop, min_dim=2)
        shapes = [tuple(crop.shape) for crop in crops]
        if crops[0].dim() != 2 or len(set(shapes)) != 1:
            raise ValueError(f"every crop's outputs must be (batch_size, n_prototypes) of one shape, got {shapes}")
        if queue is not None:
            if len(queue) < len(high):
                raise ValueError(f"queue_outputs needs one tensor per high-resolution crop ({len(high)}), "
                                 f"got {len(queue)}")
            for i in range(len(high)):
                check_float_tensor(f"queue_outputs[{i}]", queue[i], min_dim=2)
                if queue[i].dim() != 2 or queue[i].shape[1] != shapes[0][1]:
                    raise ValueError(f"queue_outputs[{i}] must be (queue_length, {shapes[0][1]}), "
                                     f"got {tuple(queue[i].shape)}")
        return crops


# ----------------------------------------------------------------------------- Barlow Twins and VICReg


class BarlowTwinsLoss(nn.Module):
    """Replaces ``lightly.loss.BarlowTwinsLoss``; runs :func:`fastssl.ops.barlow_twins_loss`
    (fused standardization and cross-correlation, no D x D buffer when N < D).

    ``forward(z_a, z_b)``: two (N, D) projections -> ``sum_i (1 - C_ii)^2 + lambda_param *
    sum_{i != j} C_ij^2`` with C = z_a_norm.T z_b_norm / N, each view standardized over the
    batch (biased variance, eps 1e-5); a 0-dim tensor.

    Differs from lightly: 16-bit inputs give a float32 loss; non-finite inputs raise
    ``ValueError``. ``gather_distributed=True`` with more than one process raises
    ``NotImplementedError``: lightly averages per-process cross-correlation matrices of
    per-process standardized embeddings, fastssl standardizes and correlates the global batch
    (:class:`fastssl.nn.BarlowTwinsLoss` does that). With one process it is lightly's loss.
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False):
        super().__init__()
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed
        if gather_distributed and not dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support."
            )

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if self.gather_distributed and _world_size() > 1:
            raise NotImplementedError(
                "BarlowTwinsLoss(gather_distributed=True) over several processes averages per-process "
                "cross-correlations, which fastssl does not compute: use gather_distributed=False (per-process "
                "loss), or fastssl.nn.BarlowTwinsLoss for the loss of the global batch"
            )
        return barlow_twins_loss(z_a, z_b, lambd=self.lambda_param, eps=BATCH_NORM_EPS,
                                 group=process_group_for(False))


class VICRegLoss(nn.Module):
    """Replaces ``lightly.loss.VICRegLoss``; runs :func:`fastssl.ops.vicreg_loss` (covariance
    penalty in Gram form when N < D).

    ``forward(z_a, z_b)``: two (B, ..., D) tensors of one shape, B > 1 ->
    ``lambda_param * mse(z_a, z_b) + mu_param * (variance hinges of both) / 2 + nu_param *
    (squared off-diagonal covariances of both) / D``; a 0-dim tensor. With
    ``gather_distributed`` and torch.distributed initialized, variance and covariance cover the
    global batch (gradients as lightly's all-gather), invariance stays per process. Middle
    dimensions (VICRegL's positions) are independent problems whose losses are averaged, as
    lightly's terms are means over them.

    Differs from lightly: 16-bit inputs give a float32 loss; non-finite inputs raise
    ``ValueError``; ``eps`` other than 1e-4 raises ``NotImplementedError`` (the kernels use
    VICReg's 1e-4).
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 0.0001,
    ):
        super().__init__()
        if gather_distributed and not dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support."
            )
        self.lambda_param = lambda_param
        self.mu_param = mu_param
        self.nu_param = nu_param
        self.gather_distributed = gather_distributed
        self.eps = eps
        self._check_eps()

    def _check_eps(self) -> None:
        if self.eps != VARIANCE_EPS:
            raise NotImplementedError(f"fastssl's VICReg loss uses eps={VARIANCE_EPS} (VICReg's), got eps={self.eps}")

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        assert z_a.shape[0] > 1 and z_b.shape[0] > 1, (
            f"z_a and z_b must have batch size > 1 but found {z_a.shape[0]} and {z_b.shape[0]}"
        )
        assert z_a.shape == z_b.shape, f"z_a and z_b must have same shape but found {z_a.shape} and {z_b.shape}."
        self._check_eps()
        group = process_group_for(self.gather_distributed)
        coefficients = (self.lambda_param, self.mu_param, self.nu_param)
        if z_a.dim() <= 2:
            return vicreg_loss(z_a, z_b, *coefficients, group=group)
        x, y = z_a.flatten(1, -2), z_b.flatten(1, -2)  # (B, positions, D)
        return torch.stack([vicreg_loss(x[:, p], y[:, p], *coefficients, group=group)
                            for p in range(x.shape[1])]).mean()


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``
    without a memory bank: SimCLR's NT-Xent through :func:`fastssl.ops.info_nce` (both views
    normalized, every other row of both views a negative; with ``gather_distributed``, of
    every rank, gradients flowing back to each), never forming the 2N x 2N logits. Keeps
    lightly's ``memory_bank`` (a size-0 ``MemoryBankModule``), ``cross_entropy`` and ``eps``
    attributes and state-dict keys. ``forward(out0, out1)`` -> scalar.

    Differs from lightly: a memory bank (``memory_bank_size`` other than 0) raises
    ``NotImplementedError`` (its MoCo-style loss is not served by the fused op), as does a
    temperature <= 0 (lightly accepts negative ones); 16-bit inputs give a float32 loss;
    non-finite inputs raise ``ValueError``.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False):
        super().__init__()
        if memory_bank_size not in (0, (0,), [0]) and not (isinstance(memory_bank_size, Sequence)
                                                           and memory_bank_size[0] == 0):
            raise NotImplementedError(f"NTXentLoss with a memory bank (memory_bank_size={memory_bank_size}) is "
                                      "not served by fastssl's fused loss; unpatch() for lightly's")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available")
        self.memory_bank = MemoryBankModule(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = check_positive_float("temperature", temperature)
        self.gather_distributed = gather_distributed
        self.cross_entropy = nn.CrossEntropyLoss(reduction="mean")
        self.eps = 1e-8

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return info_nce(F.normalize(out0, dim=1), F.normalize(out1, dim=1), self.temperature, symmetric=True,
                        exclude_self=True, group=process_group_for(self.gather_distributed))


# ----------------------------------------------------------------------------- patching

_REPLACEMENTS = {
    "DINOLoss": DINOLoss, "SwaVLoss": SwaVLoss, "BarlowTwinsLoss": BarlowTwinsLoss,
    "VICRegLoss": VICRegLoss, "IBOTPatchLoss": IBOTPatchLoss, "KoLeoLoss": KoLeoLoss, "NTXentLoss": NTXentLoss,
}

_PATCH = Patch({
    "lightly.loss": _REPLACEMENTS,
    "lightly.loss.dino_loss": {"DINOLoss": DINOLoss},
    "lightly.loss.swav_loss": {"SwaVLoss": SwaVLoss, "sinkhorn": sinkhorn},
    "lightly.loss.barlow_twins_loss": {"BarlowTwinsLoss": BarlowTwinsLoss},
    "lightly.loss.vicreg_loss": {"VICRegLoss": VICRegLoss},
    "lightly.loss.ibot_loss": {"IBOTPatchLoss": IBOTPatchLoss},
    "lightly.loss.koleo_loss": {"KoLeoLoss": KoLeoLoss},
    "lightly.loss.ntx_ent_loss": {"NTXentLoss": NTXentLoss},
}, Upstream("lightly", TESTED_VERSIONS))
# lightly's classes as imported, before anything is patched (a missing one fails patch()'s check).
_LIGHTLY = {name: getattr(lightly_loss, name, None) for name in _REPLACEMENTS}


def _unservable(loss: nn.Module) -> Optional[str]:
    """What fastssl's constructors refuse, read off a loss lightly built (None if served)."""
    center_function = getattr(loss, "_center_fn", None) or getattr(getattr(loss, "center", None), "_center_fn", None)
    if center_function is not None and center_function is not CENTER_MODE_TO_FUNCTION["mean"]:
        return "its center mode is not 'mean', the only one fastssl's losses compute"
    if type(loss) is _LIGHTLY["KoLeoLoss"] and loss.p != 2:
        return f"p={loss.p}: fastssl's KoLeoLoss measures Euclidean distances (p=2)"
    if type(loss) is _LIGHTLY["VICRegLoss"] and loss.eps != VARIANCE_EPS:
        return f"eps={loss.eps}: fastssl's VICReg loss uses eps={VARIANCE_EPS}"
    if type(loss) is _LIGHTLY["NTXentLoss"] and any(loss.memory_bank.size):
        return f"it has a memory bank (size {loss.memory_bank.size}), which fastssl's fused loss does not serve"
    for name in ("temperature", "sinkhorn_epsilon"):  # fastssl's SwaV and NT-Xent take positive ones only
        if isinstance(getattr(loss, name, None), (int, float)) and getattr(loss, name) <= 0:
            return f"{name}={getattr(loss, name)} is not positive"
    return None


def _swaps() -> list[Swap]:
    # lightly's classes and fastssl's keep the same attributes, so the class is all that changes.
    return [Swap(_LIGHTLY[name], replacement, _unservable) for name, replacement in _REPLACEMENTS.items()]


def patch(model: Optional[nn.Module] = None):
    """Without ``model``: install the replacements into lightly (see the module docstring);
    returns the :class:`~fastssl.integrations._patching.Patch`, a context manager that
    unpatches on exit. With ``model`` (a lightly loss, or a module such as a LightningModule
    holding some as attributes): turn its lightly losses into fastssl's in place, keeping their
    buffers and state; returns ``model``."""
    if model is None:
        return _PATCH.patch()
    _PATCH.check()
    return swap_modules(model, _swaps())


def unpatch(model: Optional[nn.Module] = None):
    """Without ``model``: restore lightly's classes and function. With ``model``: turn its
    fastssl losses (swapped or built while patched) back into lightly's, in place; returns
    ``model``."""
    if model is None:
        _PATCH.unpatch()
        return None
    return swap_modules(model, _swaps(), to_fastssl=False)
