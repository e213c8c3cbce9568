"""InfoNCE / NT-Xent (SimCLR, MoCo v3, CLIP) in plain PyTorch: the functions of
:func:`fastssl.ops.info_nce` (also its CPU fallback and test oracle) and the originals.

For query rows q_i (M, D) against key rows k_j (N_all, D) gathered over the ranks, with the
positive of q_i at key ``row_offset + i`` (the matching global row), and optionally the
query set's own gathered rows n_j (N_all, D) as further negatives without the row itself:

    loss = mean_i [ log( sum_j exp(q_i k_j / t) + sum_{j != row_offset + i} exp(q_i n_j / t) )
                    - q_i k_{row_offset + i} / t ]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def info_nce_reference(query: torch.Tensor, keys: torch.Tensor, negatives: Optional[torch.Tensor],
                       temperature: float, row_offset: int = 0) -> torch.Tensor:
    """The loss above, through the (M, N_all [+ N_all]) logits, in at least float32."""
    compute = torch.promote_types(query.dtype, torch.float32)
    query = query.to(compute)
    logits = query @ keys.to(compute).t() / temperature
    targets = torch.arange(query.shape[0], device=query.device) + row_offset
    if negatives is not None:
        own = query @ negatives.to(compute).t() / temperature
        own = own.masked_fill(torch.arange(own.shape[1], device=own.device)[None, :] == targets[:, None],
                              float("-inf"))
        logits = torch.cat([logits, own], dim=1)
    return F.cross_entropy(logits, targets)


def ntxent_loss_original(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.5,
                         gathered: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                         row_offset: int = 0) -> torch.Tensor:
    """SimCLR's NT-Xent as lightly's ``NTXentLoss`` computes it: both views l2-normalized,
    each row against the other view's rows (its positive at the same image) and its own
    view's other rows, cross-entropy averaged over the 2N rows. ``gathered``: both views of
    every process (``gather_distributed``), this process's rows starting at ``row_offset``."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    all0, all1 = (out0, out1) if gathered is None else (F.normalize(view, dim=1) for view in gathered)
    positives = torch.arange(out0.shape[0], device=out0.device) + row_offset
    itself = torch.arange(all0.shape[0], device=out0.device)[None, :] == positives[:, None]
    logits_00 = (out0 @ all0.t() / temperature).masked_fill(itself, float("-inf"))
    logits_11 = (out1 @ all1.t() / temperature).masked_fill(itself, float("-inf"))
    logits_01, logits_10 = out0 @ all1.t() / temperature, out1 @ all0.t() / temperature
    logits = torch.cat([torch.cat([logits_01, logits_00], dim=1), torch.cat([logits_10, logits_11], dim=1)])
    return F.cross_entropy(logits, positives.repeat(2))


def moco_v3_contrastive_loss_original(q: torch.Tensor, k: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss(q, k)`` in one process: l2-normalized q against every key
    (no gradient to the keys), cross-entropy with the positive on the diagonal, times 2 t."""
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * (2 * temperature)
