"""Backbones, heads and the multi-crop forward shared by the trainers.

A multi-crop batch is a list of crop groups, one (b_i, 3, H_i, W_i) tensor per resolution
(all global crops of the batch, then all local crops). With kernels on, a ViT runs every
group in one forward per block (:class:`fastssl.nn.PackedViT`); with kernels off it runs one
forward per group, as the original multi-crop wrappers do (timm's attention uses SDPA).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from fastssl.nn import PackedViT
from fastssl.nn.packed_vit import embed_tokens, run_block
from fastssl.train.config import TrainConfig


def build_vit(config: TrainConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    width, heads, patch_size, registers = config.vit_spec()
    vit = VisionTransformer(
        img_size=config.global_crop_size, patch_size=patch_size, embed_dim=width, depth=config.depth,
        num_heads=heads, num_classes=0, reg_tokens=registers, dynamic_img_size=True,
        drop_path_rate=config.drop_path,
        # DINOv2 ViTs (also NeCo's starting point) use LayerScale; DINO's do not.
        init_values=config.layer_scale or None,
    )
    if config.method == "dinov2":  # iBOT's masked patches take it (DINOv2's name and shape)
        vit.mask_token = nn.Parameter(torch.zeros(1, width))
    return vit


def build_resnet(config: TrainConfig) -> nn.Module:
    import torchvision

    resnet = getattr(torchvision.models, config.arch)(weights=None, zero_init_residual=True)
    resnet.fc = nn.Identity()
    if config.global_crop_size <= 64:
        # Small images (the built-in 32-px data): CIFAR-style stem, no early downsampling.
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return resnet


def load_pretrained(backbone: nn.Module, path: str) -> None:
    """Load a ViT checkpoint (timm, DINO or DINOv2 keys; a ``model``/``teacher``/``state_dict``
    entry or a bare state dict), resizing positional embeddings to this model."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = checkpoint_filter_fn(state, backbone)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} backbone weights, e.g. {missing[:5]}")
    if unexpected:
        print(f"fastssl: ignored {len(unexpected)} checkpoint entries not in the backbone, e.g. {unexpected[:3]}")


def backbone_width(backbone: nn.Module) -> int:
    return backbone.embed_dim if hasattr(backbone, "embed_dim") else backbone.inplanes


class MultiCropBackbone(nn.Module):
    """``forward(groups)`` -> one output per crop group: (b_i, n_i, C) final tokens of a ViT
    (CLS first, then registers, then patches), or (b_i, C) pooled features of a ResNet."""

    def __init__(self, backbone: nn.Module, packed: bool, checkpoint_blocks: bool = False):
        super().__init__()
        self.backbone = backbone
        self.is_vit = hasattr(backbone, "blocks")
        self.checkpoint_blocks = checkpoint_blocks
        if checkpoint_blocks and not self.is_vit:
            raise ValueError("checkpoint_blocks recomputes ViT blocks; this backbone has none")
        # Not registered as a submodule: it holds no weights of its own, and registering it
        # would list the backbone's weights twice in state dicts (under backbone.* and packed.vit.*).
        self.__dict__["packed"] = PackedViT(backbone, checkpoint_blocks) if packed and self.is_vit else None

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches (CLS and registers)."""
        return getattr(self.backbone, "num_prefix_tokens", 1)

    def forward(self, groups: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[torch.Tensor]]] = None
                ) -> list[torch.Tensor]:
        """``masks``: per group None or (b_i, patches) bool, for a ViT with a mask token."""
        if self.packed is not None:
            return self.packed(list(groups), masks)
        if not self.is_vit:
            return [self.backbone(images) for images in groups]
        if masks is None and not self.checkpoint_blocks:
            return [self.backbone.forward_features(images) for images in groups]
        # timm's forward_features, with the masks applied to the patch embeddings
        masks = [None] * len(groups) if masks is None else masks
        return [self._blocks(embed_tokens(self.backbone, images, mask)) for images, mask in zip(groups, masks)]

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.backbone.blocks:
            x = run_block(lambda module, tokens: module(tokens), block, x, checkpoint=self.checkpoint_blocks)
        return self.backbone.norm(x)

    def features(self, images: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """(B, C) image features for evaluation: pooled ResNet features; of a ViT, the CLS
        token (``pooling="cls"``) or the mean of the patch tokens (``"patches"``)."""
        out = self.forward([images])[0]
        if not self.is_vit:
            return out
        return out[:, 0] if pooling == "cls" else out[:, self.prefix_tokens:].mean(1)


def crop_groups(crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-crop (B, 3, H, W) tensors -> consecutive crops of one resolution concatenated
    (crop-major: crop 0's batch, then crop 1's, ...)."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [torch.cat(group) for group in groups]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, batch_norm: bool, activation=nn.GELU) -> nn.Sequential:
    """Linear -> [BN] -> act, repeated, then a last Linear."""
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden_dim, bias=not batch_norm)]
        modules += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        modules += [activation()]
        width = hidden_dim
    modules.append(nn.Linear(width, out_dim, bias=not batch_norm))
    return nn.Sequential(*modules)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student, updated only by :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, as one fused foreach lerp
    over all parameters (a handful of kernels instead of two per tensor). Under FSDP both
    networks hold matching shards and each process updates its own."""
    if hasattr(teacher, "reshard"):
        teacher.reshard()  # FSDP keeps a root module's parameters gathered after a forward
    teacher_params = [_local(p) for p in teacher.parameters()]
    student_params = [_local(p.detach()) for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (FSDP2 modifies modules in place)."""
    return getattr(module, "module", module)


def build_backbone(config: TrainConfig, packed: bool) -> MultiCropBackbone:
    """The config's backbone (pretrained weights loaded when given) behind the multi-crop forward."""
    backbone = build_vit(config) if config.is_vit else build_resnet(config)
    if config.pretrained is not None:
        load_pretrained(backbone, config.pretrained)
    return MultiCropBackbone(backbone, packed, config.checkpoint_blocks)
