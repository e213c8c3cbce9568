"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn-Knopp cluster assignments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from fastssl.nn import SwAVLoss
from fastssl.profiling import LOSS
from fastssl.reference.sinkhorn import swav_loss_original
from fastssl.train.config import TrainConfig
from fastssl.train.method import COLLAPSE_SAMPLE_ROWS, Method, at_least_float32
from fastssl.train.models import MultiCropBackbone, backbone_width, build_backbone, crop_groups, mlp, unwrap

SWAV_TEMPERATURE = 0.1  # of the prototype scores' softmax: SwAV's, both losses' default


class SwAVNetwork(nn.Module):
    """Backbone -> projection MLP (BN, ReLU) -> l2-normalized embedding -> prototype scores.
    ``forward(crops)`` -> (embeddings (n_crops * B, D), scores (n_crops * B, K)), crop-major."""

    def __init__(self, backbone: MultiCropBackbone, hidden_dim: int, embedding_dim: int, n_prototypes: int):
        super().__init__()
        self.backbone = backbone
        self.projection = mlp(backbone_width(backbone.backbone), hidden_dim, embedding_dim, 2, batch_norm=True,
                              activation=nn.ReLU)
        self.prototypes = nn.Linear(embedding_dim, n_prototypes, bias=False)

    def forward(self, crops: list[torch.Tensor]):
        outputs = self.backbone(crop_groups(crops))
        features = torch.cat([out[:, 0] if self.backbone.is_vit else out for out in outputs])
        embeddings = F.normalize(self.projection(features), dim=1)
        return embeddings, self.prototypes(embeddings)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """SwAV keeps the prototypes on the unit sphere: scores are then cosine similarities."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


class OriginalSwAVLoss(nn.Module):
    """The original loss and queue handling (fastssl.reference.sinkhorn.swav_loss_original),
    holding the queue and its "in use" flag as state: the kernels-off baseline."""

    def __init__(self, n_crops: int, queue_length: int, embedding_dim: int, epsilon: float):
        super().__init__()
        self.n_crops, self.epsilon = n_crops, epsilon
        self.register_buffer("queue", torch.zeros(2, queue_length, embedding_dim))
        self.register_buffer("use_the_queue", torch.zeros((), dtype=torch.bool))

    def forward(self, scores, embeddings=None, prototypes=None):
        batch_size = scores.shape[0] // self.n_crops
        queue = self.queue if embeddings is not None and self.queue.shape[1] else None
        loss, in_use = swav_loss_original(scores, batch_size, self.n_crops, eps=self.epsilon, queue=queue,
                                          embedding=embeddings, prototypes=prototypes,
                                          use_the_queue=bool(self.use_the_queue))
        self.use_the_queue.fill_(in_use)
        return loss


class SwAV(Method):
    def __init__(self, config: TrainConfig, kernels: bool):
        super().__init__(config, kernels)
        backbone = build_backbone(config, packed=kernels)
        self.student = SwAVNetwork(backbone, config.head_hidden_dim, config.head_bottleneck_dim, config.out_dim)
        self.student.normalize_prototypes()
        n_crops = 2 + config.local_crops
        queue_length = config.swav_queue_length // _world_size()
        # Two instances: the queue (checkpointed with loss_module) starts filling only at
        # swav_epoch_queue_starts; before that the loss runs without it.
        self.loss_module, self.loss_without_queue = (
            self._loss(n_crops, length, config.head_bottleneck_dim) for length in (queue_length, 0))

    def _loss(self, n_crops: int, queue_length: int, embedding_dim: int) -> nn.Module:
        epsilon = self.config.swav_epsilon
        if self.kernels:
            return SwAVLoss(sinkhorn_epsilon=epsilon, n_crops=n_crops, queue_length=queue_length,
                            embedding_dim=embedding_dim if queue_length else None)
        return OriginalSwAVLoss(n_crops, queue_length, embedding_dim, epsilon)

    def student_outputs(self, student, crops):
        return student(crops)

    def loss_from(self, student_outputs, teacher_outputs, crops, epoch, step):
        embeddings, scores = student_outputs
        self._score_sample = scores[:COLLAPSE_SAMPLE_ROWS].detach()
        config = self.config
        with record_function(LOSS):
            if config.swav_queue_length == 0 or epoch < config.swav_epoch_queue_starts:
                return self.loss_without_queue(at_least_float32(scores))
            prototypes = unwrap(self.student).prototypes.weight
            return self.loss_module(at_least_float32(scores), at_least_float32(embeddings.detach()),
                                    at_least_float32(prototypes.detach()))

    def to(self, device):
        self.loss_without_queue.to(device)
        return super().to(device)

    @torch.no_grad()
    def output_distribution(self, epoch):
        """The predictions the codes are matched to: softmax(prototype scores / temperature)."""
        return torch.softmax(self._score_sample.float() / SWAV_TEMPERATURE, dim=-1)

    def after_backward(self, epoch, step):
        # SwAV leaves the prototypes fixed for the first iterations: the assignments settle first.
        if step < self.config.swav_freeze_prototypes_steps:
            unwrap(self.student).prototypes.weight.grad = None

    def after_optimizer_step(self, momentum):
        unwrap(self.student).normalize_prototypes()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
