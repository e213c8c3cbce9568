"""DINO (Caron et al., 2021): self-distillation of a multi-crop student into an EMA teacher."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from fastssl.nn import DINOHead, DINOLoss
from fastssl.profiling import LOSS
from fastssl.reference.dino import DINOLossOriginal
from fastssl.train.config import TrainConfig
from fastssl.train.method import COLLAPSE_SAMPLE_ROWS, Method, at_least_float32
from fastssl.train.models import MultiCropBackbone, build_backbone, crop_groups, make_teacher, unwrap


class DINONetwork(nn.Module):
    """Backbone + DINO head over all crops: (n_crops * B, out_dim) logits, crop-major."""

    def __init__(self, backbone: MultiCropBackbone, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        tokens = self.backbone(crop_groups(crops))
        return self.head(torch.cat([group[:, 0] for group in tokens]))


class DINO(Method):
    def __init__(self, config: TrainConfig, kernels: bool):
        super().__init__(config, kernels)
        backbone = build_backbone(config, packed=kernels)
        head = DINOHead(backbone.backbone.embed_dim, config.out_dim, hidden_dim=config.head_hidden_dim,
                        bottleneck_dim=config.head_bottleneck_dim, norm_last_layer=True)
        self.student = DINONetwork(backbone, head)
        self.teacher = make_teacher(self.student)
        loss_class = DINOLoss if kernels else DINOLossOriginal
        self.loss_module = loss_class(
            config.out_dim, 2 + config.local_crops, config.warmup_teacher_temp, config.teacher_temp,
            min(config.warmup_teacher_temp_epochs, config.epochs), config.epochs)

    def student_outputs(self, student, crops):
        return student(crops)

    @torch.no_grad()
    def teacher_outputs(self, crops):
        return self.teacher(crops[:2])

    def loss_from(self, student_logits, teacher_logits, crops, epoch, step):
        self._teacher_sample = teacher_logits[:COLLAPSE_SAMPLE_ROWS].detach()
        # The loss in float32: softmax over 65536 prototypes in bf16 loses the sharpened targets.
        with record_function(LOSS):
            return self.loss_module(at_least_float32(student_logits), at_least_float32(teacher_logits), epoch)

    @torch.no_grad()
    def output_distribution(self, epoch):
        """The teacher's targets: softmax((logits - center) / teacher temperature)."""
        temperature = float(self.loss_module.teacher_temp_schedule[epoch])
        return torch.softmax((self._teacher_sample.float() - self.loss_module.center) / temperature, dim=-1)

    def after_backward(self, epoch, step):
        # DINO keeps the prototypes fixed during the first epoch(s): it stabilizes training.
        if epoch < self.config.freeze_last_layer_epochs:
            for parameter in unwrap(self.student).head.last_layer.parameters():
                parameter.grad = None
