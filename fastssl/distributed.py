"""torch.distributed helpers used by the ops.

Every collective here takes an explicit ``group``; :func:`resolve_group` turns the public
``group=None`` into the default process group when torch.distributed is initialized (the
behaviour of the original SwAV and DINOv2 code) and into "no communication" otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def resolve_group(group: ProcessGroup) -> ProcessGroup:
    """The group to reduce over, or ``None`` when there is nothing to reduce with."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialized")
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def process_group_for(gather_distributed: bool, group: ProcessGroup = None) -> ProcessGroup:
    """The ``group`` an op gets for a module's ``gather_distributed`` option: ``group`` (the
    default group when None) when gathering across processes; otherwise, under
    torch.distributed, a group of this process alone, which :func:`resolve_group` reads as no
    communication, so that each process computes on its own batch."""
    if gather_distributed or not (dist.is_available() and dist.is_initialized()):
        return group
    return _this_process_only()


@functools.cache
def _this_process_only() -> "dist.ProcessGroup":
    # Standalone: nothing registered with the default group, no collective to create it.
    return dist.ProcessGroup(dist.HashStore(), 0, 1)


def group_name(group: ProcessGroup) -> str:
    """A process group's registered name ("" for no group), for passing through custom ops."""
    return "" if group is None else group.group_name


def group_from_name(name: str) -> ProcessGroup:
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def all_reduce_logsumexp(lse: torch.Tensor, group: ProcessGroup, *, base2: bool = False) -> torch.Tensor:
    """Element-wise log-sum-exp of ``lse`` across the ranks of ``group``.

    Two all-reduces of ``lse.numel()`` floats: the maximum, then the sum of ``exp(lse - max)``,
    so nothing overflows whatever the magnitudes. ``base2`` uses log2/exp2 (the kernels' unit).
    Entries that are ``-inf`` on every rank stay ``-inf``.
    """
    if group is None:
        return lse
    exp, log = (torch.exp2, torch.log2) if base2 else (torch.exp, torch.log)
    shift = lse.clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = exp(lse - shift)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return shift + log(total)


def gather_rows(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All ranks' rows of (N_local, ...) ``x``, in rank order (``x`` itself in one process);
    no autograd (see :func:`all_gather_rows`)."""
    if group is None:
        return x
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """Rows of every rank, in rank order; the backward hands each rank the gradient of its own
    rows summed over the ranks (each rank's loss used everyone's rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(local, grad, group=ctx.group)
            return local, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad.chunk(world)[dist.get_rank(ctx.group)].contiguous(), None


def all_gather_rows(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(N, ...) rows of every rank of ``group`` concatenated in rank order, differentiable;
    ``x`` itself without a group."""
    return x if group is None else _AllGatherRows.apply(x, group)
