"""Drop-in modules built on fastssl.ops."""

from fastssl.nn.dino import DINOHead, DINOLoss, IBOTPatchLoss, KoLeoLoss
from fastssl.nn.sinkhorn import SinkhornKnopp, SwAVLoss

__all__ = ["DINOHead", "DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "SinkhornKnopp", "SwAVLoss"]
