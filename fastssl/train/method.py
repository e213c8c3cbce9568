"""What a trainer needs from a method, and the registry of the methods.

A method owns its networks (the trainable ``student``, wrapped by DDP/FSDP, and an optional
EMA ``teacher``), its loss module (with its state: DINO's center, SwAV's queue, NeCo's
reference queue) and its augmentation; the training loop (fastssl.train.loop) owns the rest.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastssl.accumulate import concat_crop_major, split_batch
from fastssl.train.config import TrainConfig
from fastssl.train.data import MultiCropAugmentation, collate_crops
from fastssl.train.models import MultiCropBackbone, ema_update, unwrap
from fastssl.train.optim import split_decay


def gather_global_batch(*tensors: torch.Tensor) -> Optional[tuple[torch.Tensor, ...]]:
    """Each tensor's rows from every process in rank order, with autograd (torch.distributed.nn),
    as the eager baselines gather their embeddings; None in a single process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from torch.distributed.nn import all_gather

    return tuple(torch.cat(all_gather(tensor)) for tensor in tensors)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """16-bit outputs of autocast raised to float32 for the losses (float64 stays float64)."""
    return tensor.float() if tensor.element_size() < 4 else tensor


def micro_batch_images(batch) -> int:
    """The number of images of a batch: the rows of its first tensor (the first crop)."""
    while not torch.is_tensor(batch):
        batch = batch[0]
    return batch.shape[0]


class Method:
    """Base class: subclasses set ``student``, ``loss_module`` and optionally ``teacher``."""

    student: nn.Module
    teacher: Optional[nn.Module] = None
    loss_module: nn.Module

    def __init__(self, config: TrainConfig, kernels: bool):
        self.config = config
        self.kernels = kernels

    # data
    def augmentation(self) -> Callable:
        config = self.config
        return MultiCropAugmentation(config.global_crop_size, config.local_crop_size, config.local_crops,
                                     config.global_crop_scale, config.local_crop_scale, config.hue,
                                     config.intensity_jitter, config.invert_probability)

    collate = staticmethod(collate_crops)

    # optimization
    def parameter_groups(self) -> list[dict]:
        return split_decay(unwrap(self.student).named_parameters(), self.config.lr)

    # The loss in three parts, so that a step can run in micro-batches (fastssl.accumulate):
    # the student's outputs (with gradient) and the teacher's (without) for some images, and
    # the loss of the whole batch's outputs.
    def loss(self, student: nn.Module, batch, epoch: int, step: int) -> torch.Tensor:
        return self.loss_from(self.student_outputs(student, batch), self.teacher_outputs(batch), batch, epoch, step)

    def student_outputs(self, student: nn.Module, batch):
        """The student's outputs for ``batch``: tensors laid out as :meth:`join` expects."""
        raise NotImplementedError

    def teacher_outputs(self, batch):
        """The teacher's outputs for ``batch`` (no gradient), or None without a teacher."""
        return None

    def loss_from(self, student_outputs, teacher_outputs, batch, epoch: int, step: int) -> torch.Tensor:
        raise NotImplementedError

    def split(self, batch, micro_batch_size: int) -> list:
        """``batch`` cut into micro-batches of ``micro_batch_size`` images."""
        return split_batch(batch, micro_batch_size)

    def join(self, parts: list, micro_batches: list):
        """The micro-batches' outputs (student's or teacher's) -> the whole batch's: here
        crop-major rows, ``(crops * m, ...)`` per micro-batch of m images."""
        return concat_crop_major(parts, [micro_batch_images(micro) for micro in micro_batches])

    def output_distribution(self, epoch: int) -> Optional[torch.Tensor]:
        """A sample of the distributions the method's targets come from, (rows, K) and
        summing to 1 per row, for the collapse check; None where the method has none
        (Barlow Twins, NeCo)."""
        return None

    def after_backward(self, epoch: int, step: int) -> None:
        """Gradient surgery before clipping and the optimizer step (frozen layers)."""

    def after_optimizer_step(self, momentum: float) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, unwrap(self.student), momentum)

    # evaluation
    # What kNN evaluates of a ViT: the CLS token, or the mean patch token for dense methods.
    knn_pooling = "cls"

    def evaluation_backbone(self) -> MultiCropBackbone:
        """The backbone whose features kNN evaluates: the teacher's when there is one."""
        return (self.teacher if self.teacher is not None else unwrap(self.student)).backbone

    # state
    def modules(self) -> dict[str, nn.Module]:
        modules = {"student": unwrap(self.student), "loss": self.loss_module}
        if self.teacher is not None:
            modules["teacher"] = self.teacher
        return modules

    def to(self, device: torch.device) -> "Method":
        for module in self.modules().values():
            module.to(device)
        return self


COLLAPSE_SAMPLE_ROWS = 64  # rows of the targets' distributions the collapse check looks at per step


def collapse_statistics(distribution: torch.Tensor) -> dict[str, float]:
    """Entropies of (rows, K) distributions as fractions of log K: the mean over rows
    (``output_entropy``; 1 when every row is uniform) and that of the mean row
    (``batch_entropy``; 0 when every row puts its mass on one and the same entry)."""
    distribution = distribution.float()
    log_k = math.log(distribution.shape[1])
    row = -(distribution * distribution.clamp_min(1e-30).log()).sum(1).mean()
    mean = distribution.mean(0)
    batch = -(mean * mean.clamp_min(1e-30).log()).sum()
    return {"output_entropy": row.item() / log_k, "batch_entropy": batch.item() / log_k}


METHOD_CLASSES = {"dino": "fastssl.train.dino:DINO", "dinov2": "fastssl.train.dinov2:DINOv2",
                  "swav": "fastssl.train.swav:SwAV",
                  "barlow": "fastssl.train.barlow:BarlowTwins", "simclr": "fastssl.train.simclr:SimCLR",
                  "neco": "fastssl.train.neco:NeCo"}


def build_method(config: TrainConfig, kernels: bool) -> Method:
    module_name, class_name = METHOD_CLASSES[config.method].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config, kernels)
