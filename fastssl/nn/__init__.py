"""Drop-in modules built on fastssl.ops."""

from fastssl.nn.barlow_twins import BarlowTwinsLoss, VICRegLoss
from fastssl.nn.dino import DINOHead, DINOHeadLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss
from fastssl.nn.sinkhorn import SinkhornKnopp, SwAVLoss

__all__ = ["BarlowTwinsLoss", "DINOHead", "DINOHeadLoss", "DINOLoss", "IBOTPatchLoss", "KoLeoLoss",
           "SinkhornKnopp", "SwAVLoss", "VICRegLoss"]
