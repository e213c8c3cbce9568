"""Barlow Twins (Zbontar et al., 2021): the cross-correlation of two views' embeddings pushed
to the identity."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from fastssl.nn import BarlowTwinsLoss
from fastssl.profiling import LOSS
from fastssl.reference.barlow_twins import barlow_twins_loss_original
from fastssl.train.config import TrainConfig
from fastssl.train.method import Method, at_least_float32, gather_global_batch
from fastssl.train.models import MultiCropBackbone, backbone_width, build_backbone, mlp


class BarlowTwinsNetwork(nn.Module):
    """Backbone -> 3-layer projector (BN, ReLU). ``forward([view_1, view_2])`` -> (z1, z2);
    each view runs separately, so batch-norm statistics are per view as in the original."""

    def __init__(self, backbone: MultiCropBackbone, hidden_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone_width(backbone.backbone), hidden_dim, out_dim, 3, batch_norm=True,
                             activation=nn.ReLU)

    def forward(self, crops: list[torch.Tensor]):
        outputs = self.backbone(crops[:2])
        return tuple(self.projector(out[:, 0] if self.backbone.is_vit else out) for out in outputs)


class OriginalBarlowTwinsLoss(nn.Module):
    """The original loss on the global batch: embeddings are all-gathered with autograd
    (torch.distributed.nn), so gradients are exact; the official code's non-autograd
    all-reduce of C would scale them by 1 / world_size (REFERENCE.md section 3)."""

    def __init__(self, lambd: float):
        super().__init__()
        self.lambd = lambd

    def forward(self, z1, z2):
        gathered = gather_global_batch(z1, z2)
        if gathered is not None:
            z1, z2 = gathered
        return barlow_twins_loss_original(z1, z2, self.lambd)


class BarlowTwins(Method):
    def __init__(self, config: TrainConfig, kernels: bool):
        super().__init__(config, kernels)
        backbone = build_backbone(config, packed=kernels)
        self.student = BarlowTwinsNetwork(backbone, config.head_hidden_dim, config.out_dim)
        self.loss_module = BarlowTwinsLoss(config.barlow_lambda) if kernels else \
            OriginalBarlowTwinsLoss(config.barlow_lambda)

    def student_outputs(self, student, crops):
        return student(crops)

    def loss_from(self, student_outputs, teacher_outputs, crops, epoch, step):
        z1, z2 = student_outputs
        with record_function(LOSS):
            return self.loss_module(at_least_float32(z1), at_least_float32(z2))
