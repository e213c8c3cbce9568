"""Memory of a computation on any device, counted tensor by tensor.

:class:`AllocationTracker` counts the storage of every tensor an op creates while it is
active (forward, backward, the loss's state updates) from the op's return until the storage
is freed, and keeps the peak of their sum. It needs no GPU: on the CPU it measures what a
step holds at once, which is what decides whether it fits a GPU (the CUDA caching
allocator's rounding and fragmentation aside). An op's result that shares the storage of one
of its inputs (a view, an in-place result, a tensor ``set_`` to a storage) is no new memory
and is not counted, also where that input existed before the tracker.

fastssl's own custom ops (namespace ``fastssl``) are counted from the inside: a dispatch mode
is switched off while an op's implementation runs, so the tracker runs the implementation
itself, with the tracker on, and sees the workspaces the launcher allocates and frees (float32
accumulators, partial results, scratch) at the moment they exist. On real tensors that is the
launcher; on fake or meta tensors it is the op's fake (``register_fake``), which allocates
what the GPU launcher does, so a fake step of real recipe sizes predicts the same peak. Other
ops' internal workspaces (aten's, other libraries' custom ops) are not seen.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch._subclasses.fake_tensor import is_fake
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
        # Views, in-place results and tensors re-pointed at a storage (set_, as Triton's
        # interpreter does with every kernel argument) hold an input's memory: not new bytes,
        # even where that input existed before the tracker did.
        inputs = {_storage_key(leaf) for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, (torch.Tensor, torch.UntypedStorage))}
        implementation = fastssl_implementation(func, args, kwargs)
        if implementation is None:
            outputs = func(*args, **(kwargs or {}))
        else:
            with self:  # dispatch pops the mode while it runs us; the op's own allocations count too
                outputs = implementation(*args, **(kwargs or {}))
        for output in tree_leaves(outputs):
            if isinstance(output, torch.Tensor) and _storage_key(output) not in inputs:
                self._count(output.untyped_storage())
        return outputs

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = _storage_key(storage)  # one per storage while it lives; views share their base's
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


def _storage_key(value: torch.Tensor | torch.UntypedStorage) -> int:
    storage = value.untyped_storage() if isinstance(value, torch.Tensor) else value
    return storage._cdata


def fastssl_implementation(func, args, kwargs) -> Callable | None:
    """The Python function behind ``func`` when it is a fastssl custom op: its fake for fake
    or meta tensors, else its implementation (the launcher); None for any other op."""
    if getattr(func, "namespace", None) != "fastssl":
        return None
    opdef = _maybe_get_opdef(func)
    if opdef is None:  # a fastssl op not made by torch.library.custom_op
        return None
    tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    if any(is_fake(tensor) or tensor.is_meta for tensor in tensors):
        if opdef._abstract_fn is None:
            raise RuntimeError(f"{func}: has no fake (register_fake), so its memory cannot be counted")
        return opdef._abstract_fn
    return opdef._init_fn


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensors created by ``fn()`` alive at once (:class:`AllocationTracker`)."""
    with AllocationTracker() as tracker:
        fn()
    return tracker.peak_bytes
