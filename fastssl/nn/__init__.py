"""Drop-in modules built on fastssl.ops."""

from fastssl.nn.attention import BlockDiagonalMask, MemEffAttention, MultiCropAttention
from fastssl.nn.barlow_twins import BarlowTwinsLoss, VICRegLoss
from fastssl.nn.diffsort import DiffSortNet
from fastssl.nn.dino import DINOHead, DINOHeadLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss
from fastssl.nn.info_nce import InfoNCELoss, NTXentLoss
from fastssl.nn.neco import NeCoLoss, align_crop_overlap
from fastssl.nn.packed_vit import PackedViT, pack_crops, unpack_crops
from fastssl.nn.sinkhorn import SinkhornKnopp, SwAVLoss

__all__ = ["BarlowTwinsLoss", "BlockDiagonalMask", "DINOHead", "DINOHeadLoss", "DINOLoss", "DiffSortNet",
           "IBOTPatchLoss", "InfoNCELoss", "KoLeoLoss", "MemEffAttention", "MultiCropAttention", "NTXentLoss",
           "NeCoLoss", "PackedViT",
           "SinkhornKnopp", "SwAVLoss", "VICRegLoss", "align_crop_overlap", "pack_crops", "unpack_crops"]
