"""Functional API: one module per op (kernels beside their launcher and custom op)."""

from fastssl.ops.sinkhorn import sinkhorn_knopp

__all__ = ["sinkhorn_knopp"]
