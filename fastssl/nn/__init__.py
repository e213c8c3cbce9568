"""Drop-in modules built on fastssl.ops."""

from fastssl.nn.sinkhorn import SinkhornKnopp, SwAVLoss

__all__ = ["SinkhornKnopp", "SwAVLoss"]
