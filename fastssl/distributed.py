"""torch.distributed helpers used by the ops.

Every collective here takes an explicit ``group``; :func:`resolve_group` turns the public
``group=None`` into the default process group when torch.distributed is initialized (the
behaviour of the original SwAV and DINOv2 code) and into "no communication" otherwise.
"""

from __future__ import annotations

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
