"""One ViT forward over every crop resolution at once (REFERENCE.md section 6).

Multi-crop training runs a ViT over crop groups of different sizes (2 x 224 px globals and
6-10 x 96 px locals per image). Instead of one forward per resolution, :class:`PackedViT`
embeds each group (patch embedding, CLS/register tokens, positional embeddings
interpolated to the group's grid), packs all tokens into one (total_tokens, C) tensor and
runs each block once: token-wise layers see one large batch, and attention runs through
:func:`fastssl.ops.varlen_attention` with each image attending only to itself.

Stochastic depth is the efficient form DINOv2 uses: per group, a residual branch runs on
b' = max(int(b * (1 - drop)), 1) random images only, and its output is added back scaled
by b / b' (an unbiased estimate of the branch at a fraction of its cost).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from fastssl.nn.attention import BlockDiagonalMask, packed_attention


def pack_crops(crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, BlockDiagonalMask]:
    """[(b_i, n_i, C)] -> (packed (sum_i b_i n_i, C), mask); :func:`unpack_crops` inverts it."""
    if not crops:
        raise ValueError("pack_crops needs at least one crop group")
    width = crops[0].shape[-1]
    for index, crop in enumerate(crops):
        if crop.dim() != 3 or crop.shape[-1] != width:
            raise ValueError(f"crop group {index} must be (b, n, {width}), got {tuple(crop.shape)}")
    mask = BlockDiagonalMask([(crop.shape[0], crop.shape[1]) for crop in crops])
    return torch.cat([crop.reshape(-1, width) for crop in crops]), mask


def unpack_crops(packed: torch.Tensor, mask: BlockDiagonalMask) -> list[torch.Tensor]:
    """(total_tokens, C) -> [(b_i, n_i, C)], views of ``packed``."""
    return mask.split(packed)


def _block_parts(block: nn.Module):
    """(norm1, attn, ls1, drop1, norm2, mlp, ls2, drop2) of a timm, DINO or DINOv2 block."""
    identity = nn.Identity()
    drop1 = getattr(block, "drop_path1", None) or getattr(block, "drop_path", identity)
    drop2 = getattr(block, "drop_path2", None) or getattr(block, "drop_path", identity)
    return (block.norm1, block.attn, getattr(block, "ls1", identity), drop1,
            block.norm2, block.mlp, getattr(block, "ls2", identity), drop2)


def _drop_probability(drop_path: nn.Module) -> float:
    return float(getattr(drop_path, "drop_prob", 0.0))


def _kept_images(mask: BlockDiagonalMask, drop: float, device: torch.device):
    """Token indices of b' random images per group, the mask of those images, and the
    per-token scale b / b'."""
    indices, groups, scales, start = [], [], [], 0
    for b, n in mask.groups:
        kept = max(int(b * (1 - drop)), 1)
        images = torch.randperm(b, device=device)[:kept]
        indices.append((start + images[:, None] * n + torch.arange(n, device=device)).reshape(-1))
        scales.append(torch.full((kept * n, 1), b / kept, device=device))
        groups.append((kept, n))
        start += b * n
    return torch.cat(indices), BlockDiagonalMask(groups), torch.cat(scales)


def add_residual(x: torch.Tensor, mask: BlockDiagonalMask, branch, drop_path: nn.Module, training: bool):
    """x + drop_path(branch(x, mask)), with stochastic depth run on kept images only."""
    drop = _drop_probability(drop_path)
    if not training or drop == 0.0:
        return x + branch(x, mask)
    indices, kept_mask, scale = _kept_images(mask, drop, x.device)
    residual = branch(x.index_select(0, indices), kept_mask)
    return x.index_add(0, indices, residual * scale.to(residual.dtype))


def packed_block_forward(block: nn.Module, x: torch.Tensor, mask: BlockDiagonalMask) -> torch.Tensor:
    """A pre-norm transformer block (timm, DINO or DINOv2 layout) over packed tokens."""
    norm1, attn, ls1, drop1, norm2, mlp, ls2, drop2 = _block_parts(block)
    x = add_residual(x, mask, lambda t, m: ls1(packed_attention(attn, norm1(t), m)), drop1, block.training)
    return add_residual(x, mask, lambda t, m: ls2(mlp(norm2(t))), drop2, block.training)


def _flat_blocks(blocks: nn.Module):
    """DINOv2 may chunk its blocks (lists padded with Identity); yield the blocks."""
    for block in blocks:
        if isinstance(block, nn.ModuleList):
            yield from (b for b in block if not isinstance(b, nn.Identity))
        else:
            yield block


def embed_tokens(vit: nn.Module, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b, 3, H, W) -> (b, n, C) tokens entering the first block of a timm, DINO or DINOv2 ViT.
    ``masks`` (b, patches) bool replaces those patch embeddings with the ViT's ``mask_token``
    (1, C) before the prefix tokens and positional embeddings are added, as DINOv2's
    ``prepare_tokens_with_masks`` does (a timm ViT gets that parameter from its trainer)."""
    if hasattr(vit, "prepare_tokens_with_masks"):  # DINOv2
        return vit.prepare_tokens_with_masks(images, masks)
    if masks is not None and not hasattr(vit, "mask_token"):
        raise ValueError("masks need a ViT with a mask token (DINOv2's prepare_tokens_with_masks, or a "
                         f"mask_token parameter); {type(vit).__name__} has none")
    if hasattr(vit, "prepare_tokens"):  # DINO
        if masks is not None:
            raise ValueError("masks are supported for DINOv2 and timm ViTs, not DINO's prepare_tokens")
        return vit.prepare_tokens(images)
    patches = vit.patch_embed(images)  # timm: (b, h, w, C) with dynamic_img_size, else (b, n, C)
    if masks is not None:
        patches = torch.where(masks.view(patches.shape[:-1]).unsqueeze(-1), vit.mask_token.to(patches.dtype),
                              patches)
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(patches)))


class PackedViT(nn.Module):
    """Runs ``vit`` over crop groups of several resolutions in one forward per block.

    ``vit``: a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` (so that its
    positional embeddings interpolate per resolution), or a DINO / DINOv2 ViT (which
    interpolate in ``prepare_tokens`` / ``prepare_tokens_with_masks``). Its weights are
    used as they are; nothing is copied.

    ``forward(crops, masks=None)``: a list of image batches (b_i, 3, H_i, W_i) and optional
    per-group (b_i, patches_i) bool masks (the masked patches take the ViT's mask token; see
    :func:`embed_tokens`); returns the final normalized tokens
    per group, [(b_i, n_i, C)] in order (CLS at index 0, then registers, then patches), equal
    to ``vit.forward_features`` run per group.

    ``checkpoint_blocks``: keep only each block's input for backward and recompute the block
    there (activation checkpointing): the activations of one block at a time instead of all,
    for one more forward of the blocks.
    """

    def __init__(self, vit: nn.Module, checkpoint_blocks: bool = False):
        super().__init__()
        if hasattr(vit, "patch_embed") and hasattr(vit, "_pos_embed") and not getattr(vit, "dynamic_img_size", True):
            raise ValueError("a timm VisionTransformer must be built with dynamic_img_size=True to take "
                             "several resolutions")
        self.vit = vit
        self.checkpoint_blocks = checkpoint_blocks

    def embed(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        return embed_tokens(self.vit, images, masks)

    def forward(self, crops: Sequence[torch.Tensor],
                masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
        """``crops``: [(b_i, 3, H_i, W_i)]; ``masks``: None, or per group None or a (b_i,
        patches_i) bool tensor of the patches to mask (iBOT's student crops)."""
        masks = [None] * len(crops) if masks is None else list(masks)
        if len(masks) != len(crops):
            raise ValueError(f"masks must hold one entry per crop group ({len(crops)}), got {len(masks)}")
        x, mask = pack_crops([self.embed(images, group_masks) for images, group_masks in zip(crops, masks)])
        for block in _flat_blocks(self.vit.blocks):
            x = run_block(packed_block_forward, block, x, mask, checkpoint=self.checkpoint_blocks)
        return unpack_crops(self.vit.norm(x), mask)


def run_block(forward, block: nn.Module, *inputs, checkpoint: bool):
    """``forward(block, *inputs)``; with ``checkpoint`` (and gradients on), its activations are
    not kept but recomputed in backward (stochastic depth replays the same draws: the RNG
    state is restored for the recompute)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, block, *inputs, use_reentrant=False)
    return forward(block, *inputs)
