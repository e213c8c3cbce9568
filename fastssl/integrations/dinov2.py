"""DINOv2 (facebookresearch/dinov2) on fastssl's kernels, without xformers.

One line in DINOv2's training script, before the model and the losses are built::

    import fastssl.integrations.dinov2; fastssl.integrations.dinov2.patch()

What ``patch()`` replaces (``unpatch()`` restores it; ``with patch():`` does both):

- ``dinov2.loss.DINOLoss``, ``iBOTPatchLoss`` and ``KoLeoLoss``: the classes below, with
  DINOv2's constructors, methods, ``center`` buffers and state-dict keys, on the fused
  cross-entropy kernel (:func:`fastssl.ops.dino_cross_entropy`) and fastssl's Sinkhorn-Knopp.
  Every module that imported them by name is rebound too (see fastssl.integrations._patching).
- ``MemEffAttention.forward`` (dinov2.layers.attention): attention through
  :func:`fastssl.ops.varlen_attention`, for one (B, N, C) batch or, with ``attn_bias``, for
  packed sequences of several crop sizes. The class itself stays, so models built before
  ``patch()`` and DINOv2's ``isinstance(self.attn, MemEffAttention)`` check work as before.
- The nested (multi-crop) path of ``NestedTensorBlock``, which DINOv2's
  ``forward_features_list`` takes: in dinov2.layers.block, ``XFORMERS_AVAILABLE``, ``fmha``
  (its ``BlockDiagonalMask`` becomes :class:`fastssl.nn.BlockDiagonalMask`) and the two
  xformers functions of its stochastic depth, ``index_select_cat`` and ``scaled_index_add``
  (here in plain PyTorch). So ``forward_features_list([globals, locals], [masks, None])``
  with iBOT masks and stochastic depth in training runs on fastssl's kernels.

A model that exists already (``SSLMetaArch``, a backbone, a loss, loaded from a checkpoint
or not) is patched in place instead: ``patch(model=ssl_meta_arch)`` swaps the class of its
``DINOLoss``, ``iBOTPatchLoss`` and ``KoLeoLoss`` (a pending asynchronous center update is
folded in first), of each ``MemEffAttention`` (a subclass whose forward is the one above) and
of each ``NestedTensorBlock`` (a subclass whose nested path is DINOv2's own code reading the
mask and helpers above from a namespace of its own, so dinov2.layers.block itself is left
alone). Parameters, buffers and state-dict keys stay; ``unpatch(model=...)`` restores
DINOv2's exact classes.

Tested with (``TESTED_VERSIONS``; on another version patch() still checks every name it
replaces or builds on and its signature, and raises
:class:`~fastssl.integrations.UpstreamMismatch` naming what changed, patching
nothing):

=========== ===================================================================
dinov2      0.0.1.dev2 (PyPI, before register tokens); 0.0.1, the current
            official code (register tokens; the patched names are the same)
=========== ===================================================================
"""

from __future__ import annotations

import importlib
import types
from typing import Optional, Sequence

import torch
from torch import nn

from fastssl.integrations._patching import Patch, Swap, Upstream, swap_modules
from fastssl.nn import IBOTPatchLoss as _IBOTPatchLoss
from fastssl.nn import KoLeoLoss as _KoLeoLoss
from fastssl.nn.attention import BlockDiagonalMask, packed_attention
from fastssl.nn.dino import _TeacherTargets
from fastssl.ops.dino_loss import dino_cross_entropy
from fastssl.ops.sinkhorn import sinkhorn_knopp


class DINOLoss(_TeacherTargets, nn.Module):
    """DINOv2's ``DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)``.

    ``forward(student_output_list, teacher_out_softmaxed_centered_list)``: lists of (B, K)
    student logits and (B, K) teacher probabilities (one B for all); the sum over every
    (student, teacher) pair, same views included, of the batch-mean cross-entropy, in one
    fused pass. ``softmax_center_teacher``, ``sinkhorn_knopp_teacher``, ``update_center``,
    ``reduce_center_update`` and ``apply_center_update`` as DINOv2: the center's all-reduce
    is launched by ``update_center`` and applied at the next ``softmax_center_teacher``.
    Buffer ``center`` (1, K).
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self._init_center((1, out_dim), center_momentum, async_update=True, group=None)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        return sinkhorn_knopp(teacher_output, eps=teacher_temp, n_iters=n_iterations)

    def forward(self, student_output_list: Sequence[torch.Tensor],
                teacher_out_softmaxed_centered_list: Sequence[torch.Tensor]) -> torch.Tensor:
        students, teachers = list(student_output_list), list(teacher_out_softmaxed_centered_list)
        shapes = {tuple(t.shape) for t in students + teachers}
        if not students or not teachers or len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError("student_output_list and teacher_out_softmaxed_centered_list must be non-empty lists "
                             f"of (B, K) tensors of one shape, got {sorted(shapes)}")
        batch = students[0].shape[0]
        weights = dict(device=students[0].device, dtype=torch.promote_types(students[0].dtype, torch.float32))
        loss, _ = dino_cross_entropy(
            torch.cat(students), torch.cat(teachers), len(students), len(teachers), self.student_temp,
            pair_weights=torch.ones(len(teachers), len(students), **weights),
            sample_weights=torch.full((batch,), 1.0 / batch, **weights))
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        self._start_center_update(teacher_output.float().sum(0), len(teacher_output))


class iBOTPatchLoss(_IBOTPatchLoss):  # noqa: N801 (DINOv2's name)
    """DINOv2's ``iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)``:
    :class:`fastssl.nn.IBOTPatchLoss` (``forward_masked``, the teacher-target and center
    methods) plus DINOv2's unmasked ``forward(student_patch_tokens, teacher_patch_tokens,
    student_masks_flat)`` on (B, N, K) tokens and (B, N) masks, and ``reduce_center_update``."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__(patch_out_dim, student_temp, center_momentum)

    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):  # DINOv2's argument name
        return super().softmax_center_teacher(teacher_patch_tokens, teacher_temp)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """-mean over images of (sum over masked patches of the cross-entropy) / masked patches."""
        images, patches, dim = student_patch_tokens.shape
        if teacher_patch_tokens.shape != student_patch_tokens.shape or student_masks_flat.shape != (images, patches):
            raise ValueError(f"student and teacher patch tokens must be (B, N, K) of one shape and the masks "
                             f"(B, N), got {tuple(student_patch_tokens.shape)}, {tuple(teacher_patch_tokens.shape)} "
                             f"and {tuple(student_masks_flat.shape)}")
        masks = student_masks_flat.to(torch.promote_types(student_patch_tokens.dtype, torch.float32))
        weights = (masks / masks.sum(-1, keepdim=True).clamp(min=1.0) / images).flatten()
        loss, _ = dino_cross_entropy(
            student_patch_tokens.reshape(-1, dim), teacher_patch_tokens.reshape(-1, dim), 1, 1, self.student_temp,
            pair_weights=torch.ones(1, 1, device=weights.device, dtype=weights.dtype), sample_weights=weights)
        return loss

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens):
        self.update_center(teacher_patch_tokens)


class KoLeoLoss(_KoLeoLoss):
    """DINOv2's ``KoLeoLoss()``: :class:`fastssl.nn.KoLeoLoss`, with DINOv2's ``pdist``
    submodule and ``pairwise_NNs_inner`` method."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):  # noqa: N802 (DINOv2's name)
        """Index of each l2-normalized row's nearest other row."""
        dots = x @ x.t()
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        return dots.argmax(dim=1)


def memory_efficient_attention_forward(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
    """``MemEffAttention.forward``: (B, N, C) sequences, or with ``attn_bias`` (a
    block-diagonal mask: fastssl's or xformers') the sequences packed in x of shape
    (1, total_tokens, C), through :func:`fastssl.ops.varlen_attention`."""
    if attn_bias is None:
        B, N, C = x.shape
        return packed_attention(self, x.reshape(B * N, C), BlockDiagonalMask([(B, N)])).view(B, N, C)
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"with attn_bias, x must be (1, total_tokens, C), got {tuple(x.shape)}")
    return packed_attention(self, x[0], attn_bias).unsqueeze(0)


def index_select_cat(sources: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """xformers' ``index_select_cat``: rows ``indices[i]`` of each ``sources[i]``, flattened
    and concatenated into one 1-D tensor."""
    return torch.cat([source.index_select(0, index).reshape(-1) for source, index in zip(sources, indices)])


def scaled_index_add(input: torch.Tensor, index: torch.Tensor, source: torch.Tensor, scaling=None,
                     alpha: float = 1.0) -> torch.Tensor:
    """xformers' ``scaled_index_add``: ``input`` with ``alpha * source * scaling`` added at
    rows ``index`` (out of place, so autograd sees it)."""
    return input.index_add(0, index, source if scaling is None else source * scaling, alpha=alpha)


TESTED_VERSIONS = ("0.0.1.dev2", "0.0.1")

_BLOCK_HELPERS = ("get_attn_bias_and_cat", "drop_add_residual_stochastic_depth_list", "add_residual",
                  "get_branges_scales")
_PATCH = Patch({
    "dinov2.loss": {"DINOLoss": DINOLoss, "iBOTPatchLoss": iBOTPatchLoss, "KoLeoLoss": KoLeoLoss},
    "dinov2.layers.attention:MemEffAttention": {"forward": memory_efficient_attention_forward},
    "dinov2.layers.block": {"XFORMERS_AVAILABLE": True,
                            "fmha": types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask),
                            "index_select_cat": index_select_cat, "scaled_index_add": scaled_index_add},
}, Upstream("dinov2", TESTED_VERSIONS), optional=("fmha", "index_select_cat", "scaled_index_add"),
    # what patch(model=...) builds on besides: the block's nested path and the helpers it calls
    requires={"dinov2.layers.block": ("NestedTensorBlock", *_BLOCK_HELPERS),
              "dinov2.layers.block:NestedTensorBlock": ("forward", "forward_nested")})


def patch(model: Optional[nn.Module] = None):
    """Without ``model``: install fastssl into DINOv2 (see the module docstring); returns a
    context manager that unpatches on exit. With ``model`` (an ``SSLMetaArch``, a backbone, a
    loss, built already): swap its DINOv2 losses, ``MemEffAttention`` and ``NestedTensorBlock``
    modules for fastssl's in place, keeping parameters, buffers and centers; returns ``model``."""
    if model is None:
        return _PATCH.patch()
    _PATCH.check()
    return swap_modules(model, _swaps())


def unpatch(model: Optional[nn.Module] = None):
    """Without ``model``: restore DINOv2's own classes, methods and flags. With ``model``: turn
    its fastssl modules (swapped, or losses built while patched) back into DINOv2's exact
    classes, in place; returns ``model``."""
    if model is None:
        _PATCH.unpatch()
        return None
    return swap_modules(model, _swaps(), to_fastssl=False)


# ----------------------------------------------------------------------------- modules built before patch()

# DINOv2's loss attributes for its asynchronous center update, and fastssl's for the same.
_DINOV2_CENTER_STATE = ("updated", "reduce_handle", "async_batch_center")
_FASTSSL_CENTER_STATE = ("async_center", "group", "_pending_center")


def _center_to_fastssl(count_attribute: str):
    def convert(loss: nn.Module) -> None:
        loss.apply_center_update()  # DINOv2's: a pending all-reduce is waited for and folded in
        for name in (*_DINOV2_CENTER_STATE, count_attribute):
            loss.__dict__.pop(name, None)  # never raises: other modules may have been swapped already
        loss.async_center, loss.group, loss._pending_center = True, None, None
        if count_attribute == "len_teacher_patch_tokens":
            loss.patch_out_dim = loss.center.shape[-1]
    return convert


def _center_to_dinov2(count_attribute: str):
    def convert(loss: nn.Module) -> None:
        loss.apply_center_update()  # fastssl's, likewise
        for name in (*_FASTSSL_CENTER_STATE, "patch_out_dim"):
            loss.__dict__.pop(name, None)
        loss.updated, loss.reduce_handle, loss.async_batch_center = True, None, None
        setattr(loss, count_attribute, None)
    return convert


def _rebound(function: types.FunctionType, namespace: dict) -> types.FunctionType:
    """``function``'s own code reading its module-level names from ``namespace``."""
    rebound = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                                 function.__closure__)
    rebound.__kwdefaults__, rebound.__qualname__ = function.__kwdefaults__, function.__qualname__
    return rebound


def _nested_block_class(upstream: type) -> type:
    """A subclass of DINOv2's ``NestedTensorBlock`` whose nested path runs DINOv2's own code
    on fastssl's mask and helpers: its methods, and the module functions they call, read the
    names that ``patch()`` would replace in dinov2.layers.block from a namespace of their own,
    so one model is served while the module (and every other model) stays DINOv2's."""
    block_module = importlib.import_module(upstream.__module__)
    namespace = dict(vars(block_module), **_PATCH.replacements["dinov2.layers.block"], attn_bias_cache={})
    for name in _BLOCK_HELPERS:
        namespace[name] = _rebound(getattr(block_module, name), namespace)
    return type("NestedTensorBlock", (upstream,), {
        "__module__": __name__, "__doc__": "DINOv2's NestedTensorBlock whose nested (multi-crop) path runs "
                                           "on fastssl's kernels, without xformers.",
        "forward": _rebound(upstream.forward, namespace),
        "forward_nested": _rebound(upstream.forward_nested, namespace)})


def _attention_class(upstream: type) -> type:
    return type("MemEffAttention", (upstream,), {
        "__module__": __name__, "__doc__": "DINOv2's MemEffAttention on fastssl.ops.varlen_attention.",
        "forward": memory_efficient_attention_forward})


_SWAPS: list[Swap] = []


def __getattr__(name: str):
    """``MemEffAttention`` and ``NestedTensorBlock``, the classes patch(model=...) swaps in:
    built with DINOv2's on first use, and found by name (so a pickled model unpickles)."""
    if name in ("MemEffAttention", "NestedTensorBlock"):
        return next(swap.replacement for swap in _swaps() if swap.replacement.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swaps() -> list[Swap]:
    """Built at the first patch(model=...) (after the check), once: DINOv2 is imported then."""
    if not _SWAPS:
        losses = importlib.import_module("dinov2.loss")
        attention = importlib.import_module("dinov2.layers.attention")
        block = importlib.import_module("dinov2.layers.block")
        # DINOv2's own classes, also while a global patch() has rebound their names to fastssl's.
        dinov2_losses = {name: _PATCH.original(losses.__name__, name) for name in ("DINOLoss", "iBOTPatchLoss",
                                                                                  "KoLeoLoss")}
        _SWAPS.extend([
            Swap(dinov2_losses["DINOLoss"], DINOLoss, to_replacement=_center_to_fastssl("len_teacher_output"),
                 to_upstream=_center_to_dinov2("len_teacher_output")),
            Swap(dinov2_losses["iBOTPatchLoss"], iBOTPatchLoss,
                 to_replacement=_center_to_fastssl("len_teacher_patch_tokens"),
                 to_upstream=_center_to_dinov2("len_teacher_patch_tokens")),
            Swap(dinov2_losses["KoLeoLoss"], KoLeoLoss),
            Swap(attention.MemEffAttention, _attention_class(attention.MemEffAttention)),
            Swap(block.NestedTensorBlock, _nested_block_class(block.NestedTensorBlock)),
        ])
    return _SWAPS
