"""Sinkhorn-Knopp modules: the bare op and SwAV's swapped-prediction loss."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastssl._checks import check_float_tensor, check_positive_float, check_positive_int
from fastssl.distributed import ProcessGroup
from fastssl.ops.sinkhorn import sinkhorn_knopp

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]


class SinkhornKnopp(nn.Module):
    """``Q = SinkhornKnopp(n_iters, eps)(scores)``: (..., B, K) scores -> (..., B, K) float32
    assignments, rows summing to one. See :func:`fastssl.ops.sinkhorn_knopp`."""

    def __init__(self, n_iters: int = 3, eps: float = 0.05, group: ProcessGroup = None):
        super().__init__()
        self.n_iters = check_positive_int("n_iters", n_iters)
        self.eps = check_positive_float("eps", eps)
        self.group = group

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return sinkhorn_knopp(scores, self.eps, self.n_iters, self.group)

    def extra_repr(self) -> str:
        return f"n_iters={self.n_iters}, eps={self.eps}"


class SwAVLoss(nn.Module):
    """SwAV's swapped-prediction loss (facebookresearch/swav ``main_swav.py``), with its queue.

    For each crop ``i`` in ``crops_for_assign``, ``q_i = sinkhorn(scores_i)`` (no gradient,
    the queue's scores prepended when the queue is full); the loss is the mean over ``i`` of
    the mean over the other crops ``v`` of ``-mean_b sum_k q_i * log_softmax(scores_v / T)``.

    Args:
        temperature, sinkhorn_iterations, sinkhorn_epsilon: as in SwAV (0.1, 3, 0.05).
        crops_for_assign: indices of the crops that get Sinkhorn targets (SwAV: 0 and 1).
        n_crops: crops in a concatenated ``scores`` tensor (2 + 6 in SwAV); not needed when
            ``scores`` is a list of per-crop tensors.
        queue_length: rows of past embeddings kept per assigned crop on this process (SwAV's
            ``queue_length // world_size``); 0 disables the queue.
        embedding_dim: embedding width, required with a queue.
        group: process group Sinkhorn reduces over (see :func:`fastssl.ops.sinkhorn_knopp`).

    ``forward(scores, embeddings=None, prototypes=None)``:
        scores: (n_crops * B, K) prototype scores of every crop, crops concatenated in
            order, or a list of n_crops tensors (B, K).
        embeddings: (n_crops * B, D) or list of (B, D) normalized embeddings, and
        prototypes: (K, D) prototype weights (``prototypes.weight``); both required with a
            queue, which is filled first-in first-out as in SwAV and used once full.
        Returns the scalar loss.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        crops_for_assign: Sequence[int] = (0, 1),
        n_crops: Optional[int] = None,
        queue_length: int = 0,
        embedding_dim: Optional[int] = None,
        group: ProcessGroup = None,
    ):
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.sinkhorn = SinkhornKnopp(sinkhorn_iterations, sinkhorn_epsilon, group)
        self.crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if not self.crops_for_assign:
            raise ValueError("crops_for_assign must name at least one crop")
        self.n_crops = None if n_crops is None else check_positive_int("n_crops", n_crops)
        if queue_length < 0:
            raise ValueError(f"queue_length must be >= 0, got {queue_length}")
        self.queue_length = queue_length
        self.queue_filled = 0
        queue_shape = (len(self.crops_for_assign), queue_length, 0)
        if queue_length:
            embedding_dim = check_positive_int("embedding_dim (needed with a queue)", embedding_dim)
            queue_shape = (len(self.crops_for_assign), queue_length, embedding_dim)
        self.register_buffer("queue", torch.zeros(queue_shape))

    def forward(self, scores: Crops, embeddings: Optional[Crops] = None, prototypes=None):
        crops = self._split_crops("scores", scores, self.n_crops)
        batch_size, n_crops = crops[0].shape[0], len(crops)
        self._check_crops_for_assign(n_crops)
        queue_scores = self._queue_scores(embeddings, prototypes, n_crops, batch_size)

        # log-softmax in at least float32: bf16/fp16 scores are upcast, float64 stays.
        compute_dtype = torch.promote_types(crops[0].dtype, torch.float32)
        loss = crops[0].new_zeros((), dtype=compute_dtype)
        for i, crop_id in enumerate(self.crops_for_assign):
            assigned = crops[crop_id].detach()
            if queue_scores is not None:
                assigned = torch.cat((queue_scores[i].to(assigned.dtype), assigned))
            q = self.sinkhorn(assigned)[-batch_size:]
            subloss = 0.0
            for v in range(n_crops):
                if v != crop_id:
                    log_p = F.log_softmax(crops[v].to(compute_dtype) / self.temperature, dim=1)
                    subloss = subloss - torch.mean(torch.sum(q * log_p, dim=1))
            loss = loss + subloss / (n_crops - 1)
        return loss / len(self.crops_for_assign)

    def _check_crops_for_assign(self, n_crops: int) -> None:
        if n_crops < 2:
            raise ValueError(f"SwAV needs at least 2 crops, got {n_crops}")
        bad = [c for c in self.crops_for_assign if not 0 <= c < n_crops]
        if bad:
            raise ValueError(f"crops_for_assign {bad} out of range for {n_crops} crops")

    @staticmethod
    def _split_crops(name: str, value: Crops, n_crops: Optional[int]) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            check_float_tensor(name, value, min_dim=2)
            if n_crops is None:
                raise ValueError(f"{name} is one tensor: construct SwAVLoss with n_crops, or pass a list")
            if value.dim() != 2 or value.shape[0] % n_crops:
                raise ValueError(
                    f"{name} must be (n_crops * B, dim) with n_crops={n_crops}, got {tuple(value.shape)}"
                )
            return list(value.chunk(n_crops))
        crops = list(value)
        for i, crop in enumerate(crops):
            check_float_tensor(f"{name}[{i}]", crop, min_dim=2)
        if len({tuple(c.shape) for c in crops}) != 1 or crops[0].dim() != 2:
            raise ValueError(f"{name} crops must all be (B, dim), got {[tuple(c.shape) for c in crops]}")
        return crops

    @torch.no_grad()
    def _queue_scores(self, embeddings, prototypes, n_crops: int, batch_size: int):
        """Scores of the queued embeddings if the queue is full (else None), then push the
        assigned crops' embeddings, as SwAV does before each Sinkhorn call."""
        if not self.queue_length:
            return None
        if embeddings is None or prototypes is None:
            raise ValueError("SwAVLoss with a queue needs embeddings and prototypes")
        check_float_tensor("prototypes", prototypes, min_dim=2)
        embedding_crops = self._split_crops("embeddings", embeddings, n_crops)
        if len(embedding_crops) != n_crops or embedding_crops[0].shape != (batch_size, self.queue.shape[2]):
            raise ValueError(
                f"embeddings must be {n_crops} crops of ({batch_size}, {self.queue.shape[2]}), "
                f"got {[tuple(e.shape) for e in embedding_crops]}"
            )
        if prototypes.shape[1] != self.queue.shape[2]:
            raise ValueError(
                f"prototypes must be (K, {self.queue.shape[2]}), got {tuple(prototypes.shape)}"
            )
        queue_scores = None
        if self.queue_filled >= self.queue_length:
            queue_scores = [torch.mm(q, prototypes.detach().t().to(q.dtype)) for q in self.queue]
        keep = max(self.queue_length - batch_size, 0)
        for i, crop_id in enumerate(self.crops_for_assign):
            self.queue[i, batch_size:] = self.queue[i, :keep].clone()
            self.queue[i, : min(batch_size, self.queue_length)] = embedding_crops[crop_id][: self.queue_length]
        self.queue_filled = min(self.queue_filled + batch_size, self.queue_length)
        return queue_scores

    def get_extra_state(self):
        return {"queue_filled": self.queue_filled}

    def set_extra_state(self, state) -> None:
        self.queue_filled = int(state["queue_filled"])
