"""Functional API: one module per op (kernels beside their launcher and custom op)."""

from fastssl.ops.barlow_twins import barlow_twins_loss
from fastssl.ops.dino_head_loss import dino_head_cross_entropy
from fastssl.ops.dino_loss import dino_cross_entropy
from fastssl.ops.info_nce import info_nce
from fastssl.ops.neco_loss import neco_loss
from fastssl.ops.sinkhorn import sinkhorn_knopp
from fastssl.ops.soft_sort import soft_sort
from fastssl.ops.varlen_attention import varlen_attention
from fastssl.ops.vicreg import vicreg_loss

__all__ = ["barlow_twins_loss", "dino_cross_entropy", "dino_head_cross_entropy", "info_nce", "neco_loss",
           "sinkhorn_knopp",
           "soft_sort", "varlen_attention", "vicreg_loss"]
