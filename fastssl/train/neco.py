"""NeCo (Pariza et al., 2024): patch neighbour consistency, post-training a DINOv2 ViT.

For each teacher global crop c and every other crop v, the overlap of the two crops is
RoI-aligned on both patch-feature maps (7 x 7 = 49 patches); the student's and the
teacher's cosine similarities of those patches to reference patches are sorted by a
differentiable sorting network, and the student's soft permutation is trained towards
the teacher's. loss = (1/2) sum_c (1/(n_crops - 1)) sum_{v != c} L(c, v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from fastssl.nn import NeCoLoss, align_crop_overlap
from fastssl.nn.neco import cosine_similarity_rows
from fastssl.profiling import LOSS
from fastssl.reference.neco import neco_loss_original
from fastssl.train.config import TrainConfig
from fastssl.train.data import NeCoCrops, collate_neco
from fastssl.train.method import Method, at_least_float32
from fastssl.train.models import MultiCropBackbone, build_backbone, crop_groups, make_teacher, mlp, unwrap
from fastssl.train.optim import split_decay


class NeCoNetwork(nn.Module):
    """ViT -> patch tokens -> MLP head -> l2-normalized patch features.
    ``forward(crops)`` -> one (B, D, h, w) feature map per crop."""

    def __init__(self, backbone: MultiCropBackbone, hidden_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = mlp(backbone.backbone.embed_dim, hidden_dim, out_dim, 3, batch_norm=False)

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        batch = crops[0].shape[0]
        maps = []
        for tokens in self.backbone(crop_groups(crops)):
            patches = F.normalize(self.head(tokens[:, self.backbone.prefix_tokens:]), dim=-1)
            side = int(round(patches.shape[1] ** 0.5))
            grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
            maps.extend(grid.split(batch))
        return maps


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 4) x (B, 4) boxes (x1, y1, x2, y2) -> their intersections (non-empty by
    construction of the crops; kept at least a hair wide against rounding)."""
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.maximum(torch.minimum(a[:, 2:], b[:, 2:]), top_left + 1e-3)
    return torch.cat([top_left, bottom_right], dim=1)


def box_in_crop(box: torch.Tensor, crop_box: torch.Tensor, flipped: torch.Tensor, grid: int) -> torch.Tensor:
    """Image-pixel boxes -> boxes in patch units of a crop's (grid x grid) feature map,
    mirrored when the crop was flipped."""
    origin, extent = crop_box[:, :2], crop_box[:, 2:] - crop_box[:, :2]
    top_left = (box[:, :2] - origin) / extent * grid
    bottom_right = (box[:, 2:] - origin) / extent * grid
    x1 = torch.where(flipped, grid - bottom_right[:, 0], top_left[:, 0])
    x2 = torch.where(flipped, grid - top_left[:, 0], bottom_right[:, 0])
    return torch.stack([x1, top_left[:, 1], x2, bottom_right[:, 1]], dim=1)


class NeCo(Method):
    collate = staticmethod(collate_neco)
    knn_pooling = "patches"  # NeCo trains the patch tokens; its loss never reaches the CLS token

    def __init__(self, config: TrainConfig, kernels: bool):
        super().__init__(config, kernels)
        backbone = build_backbone(config, packed=kernels)
        self.student = NeCoNetwork(backbone, config.head_hidden_dim, config.head_bottleneck_dim)
        self.teacher = make_teacher(self.student)
        # The loss module holds the reference queue in both modes; with kernels off only its
        # queue is used and the loss is the original composition (dense diffsort networks).
        self.loss_module = NeCoLoss(config.head_bottleneck_dim, config.neco_aligned_side ** 2, config.neco_queue_size,
                                    config.neco_steepness, config.neco_steepness)

    def augmentation(self):
        config = self.config
        return NeCoCrops(config.global_crop_size, config.local_crop_size, config.local_crops,
                         config.global_crop_scale, config.local_crop_scale)

    def parameter_groups(self) -> list[dict]:
        student = unwrap(self.student)
        return (split_decay(student.backbone.named_parameters(), self.config.neco_backbone_lr, "backbone_")
                + split_decay(student.head.named_parameters(), self.config.lr, "head_"))

    def student_outputs(self, student, batch):
        return [at_least_float32(m) for m in student(batch[0])]

    @torch.no_grad()
    def teacher_outputs(self, batch):
        return [at_least_float32(m) for m in self.teacher(batch[0][:2])]

    def loss_from(self, student_maps, teacher_maps, batch, epoch, step):
        crops, boxes, flipped = batch
        with record_function(LOSS):
            return self._overlap_loss(student_maps, teacher_maps, boxes, flipped)

    def _overlap_loss(self, student_maps, teacher_maps, boxes, flipped):
        references = self.loss_module.references_from_queue(boxes.shape[0])
        side, pair_losses, queued = self.config.neco_aligned_side, [], None
        for c in range(2):
            for v in range(len(student_maps)):
                if v == c:
                    continue
                overlap = box_intersection(boxes[:, c], boxes[:, v])
                teacher = align_crop_overlap(teacher_maps[c], box_in_crop(overlap, boxes[:, c], flipped[:, c],
                                                                          teacher_maps[c].shape[-1]), side)
                student_features = align_crop_overlap(
                    student_maps[v], box_in_crop(overlap, boxes[:, v], flipped[:, v], student_maps[v].shape[-1]),
                    side)
                pair_losses.append(self._pair_loss(student_features, teacher, references))
                queued = teacher if queued is None else queued
        self.loss_module.update_queue(queued)
        return torch.stack(pair_losses).mean()  # = (1/2) sum_c (1/(n-1)) sum_v: every c has n - 1 pairs

    def _pair_loss(self, student_features, teacher_features, references):
        if self.kernels:
            return self.loss_module(student_features, teacher_features, references)
        references = teacher_features if references is None else references
        steepness = self.config.neco_steepness
        return neco_loss_original(cosine_similarity_rows(student_features, references),
                                  cosine_similarity_rows(teacher_features, references), steepness, steepness)
