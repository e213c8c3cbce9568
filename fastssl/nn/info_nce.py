"""Contrastive losses on :func:`fastssl.ops.info_nce` (no N x N logits in memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastssl._checks import check_positive_float
from fastssl.distributed import ProcessGroup, process_group_for
from fastssl.ops.info_nce import info_nce


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent: ``NTXentLoss(temperature=0.5, gather_distributed=False)``.

    ``forward(z1, z2)``: the two views' (N, D) projections, l2-normalized here; each row
    against the other view's row of the same image (its positive) and every other row of
    both views (with ``gather_distributed``, of every rank, gradients flowing back to each),
    cross-entropy averaged over the 2N rows. Returns a float32 scalar.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False, group: ProcessGroup = None):
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.gather_distributed = gather_distributed
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return info_nce(F.normalize(z1, dim=1), F.normalize(z2, dim=1), self.temperature, symmetric=True,
                        exclude_self=True, group=process_group_for(self.gather_distributed, self.group))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class InfoNCELoss(nn.Module):
    """MoCo v3's ``contrastive_loss(q, k)``: ``InfoNCELoss(temperature=1.0)``.

    ``forward(q, k)``: (N, D) predictions of one view and momentum-encoder keys of the other,
    both l2-normalized here; the keys of every rank are gathered without gradient (as MoCo
    v3's ``concat_all_gather``), q_i's positive is the key of the same image, and the mean
    cross-entropy is multiplied by ``2 * temperature`` (MoCo v3's scaling). MoCo v3's loss is
    ``InfoNCELoss(t)(q1, k2) + InfoNCELoss(t)(q2, k1)``. Returns a float32 scalar.
    """

    def __init__(self, temperature: float = 1.0, group: ProcessGroup = None):
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        loss = info_nce(F.normalize(q, dim=1), F.normalize(k.detach(), dim=1), self.temperature, group=self.group)
        return loss * (2 * self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
