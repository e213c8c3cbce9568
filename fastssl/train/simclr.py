"""SimCLR (Chen et al., 2020): NT-Xent between the projections of two views of every image,
the other images of the global batch (both views) as negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from fastssl.nn import NTXentLoss
from fastssl.profiling import LOSS
from fastssl.reference.info_nce import ntxent_loss_original
from fastssl.train.config import TrainConfig
from fastssl.train.method import Method, gather_global_batch
from fastssl.train.models import MultiCropBackbone, backbone_width, build_backbone, crop_groups, mlp


class OriginalNTXentLoss(nn.Module):
    """The eager NT-Xent through its 2N x 2N logits; with several processes this process's
    2N rows against the global batch, gathered with autograd, as lightly's
    ``NTXentLoss(gather_distributed=True)``."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1, z2):
        gathered = gather_global_batch(z1, z2)
        if gathered is None:
            return ntxent_loss_original(z1, z2, self.temperature)
        return ntxent_loss_original(z1, z2, self.temperature, gathered, dist.get_rank() * z1.shape[0])


class SimCLRNetwork(nn.Module):
    """Backbone -> 2-layer projector (BN, ReLU). ``forward([view_1, view_2])`` -> (z1, z2);
    the two views run as one batch, so batch-norm statistics cover both, as in SimCLR's
    code (which concatenates the views along the batch)."""

    def __init__(self, backbone: MultiCropBackbone, hidden_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone_width(backbone.backbone), hidden_dim, out_dim, 2, batch_norm=True,
                             activation=nn.ReLU)

    def forward(self, crops: list[torch.Tensor]):
        (features,) = self.backbone(crop_groups(crops[:2]))
        return self.projector(features[:, 0] if self.backbone.is_vit else features).chunk(2)


class SimCLR(Method):
    def __init__(self, config: TrainConfig, kernels: bool):
        super().__init__(config, kernels)
        backbone = build_backbone(config, packed=kernels)
        self.student = SimCLRNetwork(backbone, config.head_hidden_dim, config.out_dim)
        self.loss_module = NTXentLoss(config.simclr_temperature, gather_distributed=True) if kernels else \
            OriginalNTXentLoss(config.simclr_temperature)

    def student_outputs(self, student, crops):
        return student(crops)

    def loss_from(self, student_outputs, teacher_outputs, crops, epoch, step):
        z1, z2 = student_outputs
        with record_function(LOSS):
            # In autocast's dtype, as eager losses' matmuls run under autocast (float32 accumulation).
            return self.loss_module(z1, z2)
