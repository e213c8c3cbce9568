"""Multi-crop packed attention (REFERENCE.md section 6): plain PyTorch ground truth.

Tokens of several sequences (images, crops) are packed along one axis, ``(total_tokens,
heads, head_dim)``, with ``cu_seqlens = [0, n_1, n_1 + n_2, ...]``. Each sequence attends
only to itself (the block-diagonal mask of DINOv2's ``BlockDiagonalMask.from_seqlens``),
without a causal mask::

    out[s] = softmax(q[s] k[s]^T * scale) v[s]      for every sequence s, every head

This is the textbook formulation, computed in the inputs' dtype (float64 inputs give the
test oracle; bfloat16 / float16 inputs give the plain-PyTorch baseline whose error the
kernels are held to). It reads ``cu_seqlens`` on the host (one synchronization when it lives
on a GPU) and runs runs of equal-length sequences as one batched matmul, as DINOv2 runs each
crop group.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def sequence_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive equal-length sequences as ``(first token, sequences, length)``.
    Reads ``cu_seqlens`` on the host."""
    bounds = cu_seqlens.tolist()
    groups: list[tuple[int, int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if groups and groups[-1][2] == length and groups[-1][0] + groups[-1][1] * length == start:
            first, count, _ = groups[-1]
            groups[-1] = (first, count + 1, length)
        else:
            groups.append((start, 1, length))
    return groups


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Per-sequence softmax attention of packed ``(total_tokens, heads, head_dim)`` tensors.

    Differentiable with respect to q, k and v by autograd. Empty sequences (repeated
    entries of ``cu_seqlens``) contribute nothing.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    pieces = []
    for first, count, length in sequence_groups(cu_seqlens):
        if length == 0:
            continue
        tokens = slice(first, first + count * length)

        def batched(x):  # (count * length, H, D) -> (count, H, length, D)
            return x[tokens].reshape(count, length, *x.shape[1:]).transpose(1, 2)

        scores = (batched(q) * scale) @ batched(k).transpose(-1, -2)
        group_out = scores.softmax(dim=-1) @ batched(v)
        pieces.append(group_out.transpose(1, 2).reshape(count * length, q.shape[1], v.shape[2]))
    if not pieces:
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
