"""Memory of a computation on any device, counted tensor by tensor.

:class:`AllocationTracker` counts the storage of every tensor an op creates while it is
active (forward, backward, the loss's state updates) from the op's return until the storage
is freed, and keeps the peak of their sum. It needs no GPU: on the CPU it measures what a
step holds at once, which is what decides whether it fits a GPU (the CUDA caching
allocator's rounding and fragmentation aside). Workspaces an op allocates and frees inside
itself are not seen.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """``with AllocationTracker() as tracker: step()``, then ``tracker.peak_bytes``: the most
    bytes of tensors created inside that were alive at once (tensors that existed before,
    parameters say, are not counted)."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        for output in tree_leaves(outputs):
            if isinstance(output, torch.Tensor):
                self._count(output.untyped_storage())
        return outputs

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # one per storage while it lives; views share their base's
        if key in self._counted:
            return
        size = storage.nbytes()
        self._counted.add(key)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key, size)  # torch keeps the storage's Python object while it lives

    def _free(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live_bytes -= size


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensors created by ``fn()`` alive at once (:class:`AllocationTracker`)."""
    with AllocationTracker() as tracker:
        fn()
    return tracker.peak_bytes
