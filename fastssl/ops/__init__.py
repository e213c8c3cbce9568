"""Functional API: one module per op (kernels beside their launcher and custom op)."""

from fastssl.ops.dino_head_loss import dino_head_cross_entropy
from fastssl.ops.dino_loss import dino_cross_entropy
from fastssl.ops.sinkhorn import sinkhorn_knopp

__all__ = ["dino_cross_entropy", "dino_head_cross_entropy", "sinkhorn_knopp"]
