"""Attention modules over packed multi-crop sequences (fastssl.ops.varlen_attention).

- :class:`BlockDiagonalMask`: which tokens of a packed (total_tokens, C) tensor form each
  sequence (crop groups of b_i images with n_i tokens). It has the parts of xformers'
  ``BlockDiagonalMask`` that DINOv2 uses (``from_seqlens``, ``split``, ``q_seqinfo``), so
  DINOv2's code runs without xformers.
- :func:`packed_attention`: the attention of a timm, DINO or DINOv2 ``Attention`` module
  (its ``qkv``, ``proj``, ``num_heads``, ``scale`` and optional ``q_norm``, ``k_norm``,
  ``norm``) over packed sequences.
- :class:`MultiCropAttention`: timm's ``Attention`` constructor and state-dict keys (usable
  as a timm ``attn_layer``), ``forward(x, attn_mask=None)`` on (B, N, C), and
  ``forward_packed(x, mask)`` on (total_tokens, C).
- :class:`MemEffAttention`: DINOv2's constructor and ``forward(x, attn_bias=None)``, with
  ``attn_bias`` any block-diagonal mask exposing sequence starts (this module's mask or
  xformers' ``BlockDiagonalMask``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.ops.varlen_attention import varlen_attention


class _SeqInfo:
    """xformers' ``q_seqinfo`` view of a mask: ``seqstart`` (device tensor), ``seqstart_py``
    and ``max_seqlen``."""

    def __init__(self, mask: "BlockDiagonalMask"):
        self._mask = mask

    @property
    def seqstart(self) -> torch.Tensor:
        return self._mask.cu_seqlens()

    @property
    def seqstart_py(self) -> list[int]:
        return self._mask.seqstart_py

    @property
    def max_seqlen(self) -> int:
        return self._mask.max_seqlen


class BlockDiagonalMask:
    """Sequences packed one after another, each attending only to itself.

    ``groups``: (b_i, n_i) per crop group, in packing order (b_i sequences of n_i tokens).
    The offsets are known on the host, so no kernel ever reads them back.
    """

    def __init__(self, groups: Sequence[tuple[int, int]]):
        self.groups = tuple((int(b), int(n)) for b, n in groups)
        if not self.groups or any(b < 1 or n < 1 for b, n in self.groups):
            raise ValueError(f"every crop group needs >= 1 sequence of >= 1 token, got {list(self.groups)}")
        self.seqlens = [n for b, n in self.groups for _ in range(b)]
        self.seqstart_py = [0]
        for n in self.seqlens:
            self.seqstart_py.append(self.seqstart_py[-1] + n)
        self.max_seqlen = max(self.seqlens)
        self.total_tokens = self.seqstart_py[-1]
        self._batch_sizes = [b for b, _ in self.groups]  # the name DINOv2 sets on xformers' mask
        self._device_offsets: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int]) -> "BlockDiagonalMask":
        """One group per run of equal lengths, as DINOv2 builds its masks."""
        groups: list[list[int]] = []
        for n in seqlens:
            if groups and groups[-1][1] == n:
                groups[-1][0] += 1
            else:
                groups.append([1, n])
        return cls([tuple(g) for g in groups])

    @property
    def q_seqinfo(self) -> _SeqInfo:
        return _SeqInfo(self)

    def cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 (n_seqs + 1,) offsets on ``device``, copied there once."""
        device = torch.device(device)
        if device not in self._device_offsets:
            self._device_offsets[device] = torch.tensor(self.seqstart_py, dtype=torch.int32).to(device,
                                                                                             non_blocking=True)
        return self._device_offsets[device]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(total_tokens, C) or (1, total_tokens, C) -> [(b_i, n_i, C)] per group."""
        x = x.reshape(self.total_tokens, -1) if x.dim() == 3 and x.shape[0] == 1 else x
        if x.shape[0] != self.total_tokens:
            raise ValueError(f"expected {self.total_tokens} packed tokens, got {x.shape[0]}")
        sizes = [b * n for b, n in self.groups]
        return [part.view(b, n, -1) for part, (b, n) in zip(torch.split(x, sizes), self.groups)]


def _sequence_starts(mask) -> tuple[torch.Tensor, int]:
    """(device offsets, max_seqlen) of this module's mask or any mask with xformers'
    ``q_seqinfo`` (``seqstart`` tensor, ``max_seqlen``)."""
    if isinstance(mask, BlockDiagonalMask):
        return mask.cu_seqlens, mask.max_seqlen
    info = getattr(mask, "q_seqinfo", None)
    if info is None or not hasattr(info, "seqstart"):
        raise TypeError(f"attn_bias must be a block-diagonal mask exposing q_seqinfo.seqstart, got {type(mask)}")
    return (lambda device: info.seqstart.to(device=device, dtype=torch.int32)), int(info.max_seqlen)


def packed_attention(attn: nn.Module, x: torch.Tensor, mask) -> torch.Tensor:
    """Multi-head self-attention of ``attn``'s weights over packed sequences.

    ``x``: (total_tokens, C); ``mask``: a :class:`BlockDiagonalMask` (or xformers-like mask).
    Attention dropout is not supported by the kernels: a module with ``attn_drop.p > 0``
    raises in training mode rather than silently skip it.
    """
    dropout = getattr(attn, "attn_drop", None)
    if attn.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        raise ValueError("attention dropout (attn_drop > 0) is not supported by varlen_attention")
    offsets, max_seqlen = _sequence_starts(mask)
    tokens = x.shape[0]
    q, k, v = attn.qkv(x).view(tokens, 3, attn.num_heads, -1).unbind(1)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    out = varlen_attention(q, k, v, offsets(x.device), max_seqlen, attn.scale).reshape(tokens, -1)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    return attn.proj_drop(attn.proj(out))


class MultiCropAttention(nn.Module):
    """timm's ``Attention(dim, num_heads=8, qkv_bias=False, qk_norm=False, scale_norm=False,
    proj_bias=True, attn_drop=0., proj_drop=0., norm_layer=None)`` on the varlen kernels.

    Same submodules and state-dict keys (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
    ``proj``; ``depth``, the block index timm passes, is unused).
    ``forward(x (B, N, C), attn_mask=None)``: without a mask, B sequences of N tokens
    through :func:`fastssl.ops.varlen_attention`; with ``attn_mask`` or ``is_causal``,
    PyTorch's SDPA (the kernels are for unmasked multi-crop attention).
    ``forward_packed(x (total_tokens, C), mask)``: sequences of different lengths at once.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[type[nn.Module]] = None, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, gated: bool = False, depth: int = 0, device=None, dtype=None):
        super().__init__()
        if attn_head_dim not in (None, dim // num_heads) or dim_out not in (None, dim) or gated:
            raise ValueError("MultiCropAttention supports neither attn_head_dim, dim_out nor gated")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            norm_layer = nn.LayerNorm
        factory = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **factory) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        B, N, C = x.shape
        if attn_mask is not None or is_causal:
            return self._sdpa(x, attn_mask, is_causal)
        return self.forward_packed(x.reshape(B * N, C), BlockDiagonalMask([(B, N)])).view(B, N, C)

    def forward_packed(self, x: torch.Tensor, mask) -> torch.Tensor:
        return packed_attention(self, x, mask)

    def _sdpa(self, x, attn_mask, is_causal):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, C))))


class MemEffAttention(MultiCropAttention):
    """DINOv2's ``MemEffAttention(dim, num_heads=8, qkv_bias=False, proj_bias=True,
    attn_drop=0., proj_drop=0.)`` without xformers: ``forward(x, attn_bias=None)``, where
    ``attn_bias`` is a block-diagonal mask over x of shape (1, total_tokens, C)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop)

    def forward(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        if attn_bias is None:
            return super().forward(x)
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"with attn_bias, x must be (1, total_tokens, C), got {tuple(x.shape)}")
        return self.forward_packed(x[0], attn_bias).unsqueeze(0)
