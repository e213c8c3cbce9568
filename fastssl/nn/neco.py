"""NeCo's patch neighbour consistency loss (REFERENCE.md section 5) on fastssl's fused op."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastssl._checks import check_float_tensor, check_positive_int
from fastssl.ops.neco_loss import neco_loss
from fastssl.reference.diffsort import check_distribution, check_network


def align_crop_overlap(features: torch.Tensor, boxes: torch.Tensor, output_size: int = 7) -> torch.Tensor:
    """RoI-align each image's crop-overlap box on its patch feature map, as NeCo does.

    Args:
        features: (B, D, h, w) patch features of one crop (tokens reshaped to the patch grid).
        boxes: (B, 4) float boxes ``(x1, y1, x2, y2)`` in patch units of that crop.
        output_size: side of the aligned grid (NeCo: 7, i.e. 49 patches).
    Returns (B, output_size ** 2, D) features (torchvision ``roi_align``, ``aligned=True``,
    spatial scale 1, adaptive sampling), differentiable with respect to ``features``.
    """
    from torchvision.ops import roi_align

    check_float_tensor("features", features, min_dim=4)
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got shape {tuple(features.shape)}")
    if boxes.shape != (features.shape[0], 4):
        raise ValueError(f"boxes must be (B, 4) = ({features.shape[0]}, 4), got {tuple(boxes.shape)}")
    rois = [box[None].to(features.dtype) for box in boxes]
    aligned = roi_align(features, rois, output_size=output_size, spatial_scale=1.0, aligned=True)
    return aligned.flatten(2).transpose(1, 2)


def cosine_similarity_rows(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) x (B, K, D) -> (B * Q, K) cosine similarities."""
    similarity = F.normalize(features, dim=-1) @ F.normalize(references, dim=-1).transpose(-1, -2)
    return similarity.reshape(-1, references.shape[-2])


class NeCoLoss(nn.Module):
    """NeCo's loss for one (teacher crop, other crop) pair, with the reference-feature queue.

    Args:
        dim: feature width D (NeCo's head output: 256).
        n_references: reference patches per image K (NeCo: 49).
        queue_size: FIFO of past teacher patch features (NeCo: 8192); 0 disables it.
        steepness_student, steepness_teacher, sorting_network, distribution, art_lambda: the
            sorting networks (NeCo: bitonic, cauchy, 100).

    ``forward(student_features, teacher_features, reference_features=None)``:
        student_features, teacher_features: (B, Q, D) RoI-aligned patch features of the
            overlap (see :func:`align_crop_overlap`; Q = 49 in NeCo). No gradient flows to the
            teacher.
        reference_features: (B, K, D) reference patch features. When omitted they are drawn
            per image from the queue (K random entries) once it holds at least K features,
            else the teacher's own features are used (K must then equal Q).
        Returns ``-mean_{b, query, ref i} sum_j P_t[i, j] log P_s[i, j]`` for the cosine
        similarities of the queries to the references, sorted by the networks (guarded log,
        see :func:`fastssl.ops.neco_loss`).

    ``update_queue(features)`` pushes (N, D) teacher features (first in, first out); call it
    once per step after the losses, as a queue is used.
    """

    def __init__(self, dim: int = 256, n_references: int = 49, queue_size: int = 8192,
                 steepness_student: float = 100.0, steepness_teacher: float = 100.0,
                 sorting_network: str = "bitonic", distribution: str = "cauchy", art_lambda: float = 0.25):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.n_references = check_positive_int("n_references", n_references)
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.steepness_student, self.steepness_teacher = float(steepness_student), float(steepness_teacher)
        self.sorting_network = check_network(sorting_network)
        self.distribution = check_distribution(distribution)
        self.art_lambda = float(art_lambda)
        self.register_buffer("queue", torch.zeros(queue_size, dim))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        # Host copies of the two buffers: reading a GPU buffer every step would synchronize.
        # The buffers carry them in checkpoints and are read back once when one is loaded.
        self._position, self._count = 0, 0
        self.register_load_state_dict_post_hook(NeCoLoss._read_queue_state)

    @staticmethod
    def _read_queue_state(module, incompatible_keys) -> None:
        module._position, module._count = int(module.queue_position), int(module.queue_count)

    @torch.no_grad()
    def update_queue(self, features: torch.Tensor) -> None:
        size = self.queue.shape[0]
        if size == 0:
            return
        features = features.detach().reshape(-1, self.dim)[-size:].to(self.queue.dtype)
        indices = (self._position + torch.arange(features.shape[0], device=self.queue.device)) % size
        self.queue[indices] = features
        self._position = (self._position + features.shape[0]) % size
        self._count = min(size, self._count + features.shape[0])
        self.queue_position.fill_(self._position)
        self.queue_count.fill_(self._count)

    def references_from_queue(self, batch: int) -> Optional[torch.Tensor]:
        if self._count < self.n_references:
            return None
        picks = torch.stack([torch.randperm(self._count, device=self.queue.device)[: self.n_references]
                             for _ in range(batch)])
        return self.queue[picks]

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                reference_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_float_tensor("student_features", student_features, min_dim=3)
        check_float_tensor("teacher_features", teacher_features, min_dim=3)
        if student_features.dim() != 3 or teacher_features.shape != student_features.shape:
            raise ValueError(f"student_features and teacher_features must both be (B, Q, D), got "
                             f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
        if student_features.shape[-1] != self.dim:
            raise ValueError(f"features must have dim={self.dim} channels, got {student_features.shape[-1]}")
        teacher_features = teacher_features.detach()
        if reference_features is None:
            reference_features = self.references_from_queue(student_features.shape[0])
            if reference_features is None:
                reference_features = teacher_features
        reference_features = reference_features.detach()
        if reference_features.dim() != 3 or reference_features.shape[0] != student_features.shape[0] \
                or reference_features.shape[-1] != self.dim:
            raise ValueError(f"reference_features must be (B, K, D) with B={student_features.shape[0]}, "
                             f"D={self.dim}, got {tuple(reference_features.shape)}")
        student_sim = cosine_similarity_rows(student_features, reference_features.to(student_features.dtype))
        with torch.no_grad():
            teacher_sim = cosine_similarity_rows(teacher_features, reference_features.to(teacher_features.dtype))
        return neco_loss(student_sim, teacher_sim, self.steepness_student, self.steepness_teacher,
                         self.sorting_network, self.distribution, self.art_lambda)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_references={self.n_references}, queue_size={self.queue.shape[0]}, "
                f"{self.sorting_network}, {self.distribution}, steepness={self.steepness_student}/"
                f"{self.steepness_teacher}")
