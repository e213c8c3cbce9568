"""Drop-in modules built on fastssl.ops."""

from fastssl.nn.dino import DINOHead, DINOHeadLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss
from fastssl.nn.sinkhorn import SinkhornKnopp, SwAVLoss

__all__ = ["DINOHead", "DINOHeadLoss", "DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "SinkhornKnopp", "SwAVLoss"]
