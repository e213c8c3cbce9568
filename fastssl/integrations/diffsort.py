"""diffsort's ``DiffSortNet`` on fastssl's sorting kernels.

In a script that sorts with diffsort, add before the sorter is built::

    import fastssl.integrations.diffsort; fastssl.integrations.diffsort.patch()

It replaces ``diffsort.DiffSortNet`` (the package's name, the one in ``diffsort.diffsort``
where it is defined, and any ``from diffsort import DiffSortNet`` already made) with
:class:`DiffSortNet` below: diffsort's constructor, forward, attributes and (empty) state
dict, computed by :func:`fastssl.ops.soft_sort` (the two-column kernels on every backend
instead of dense split/combine matrix products). ``unpatch()`` restores diffsort.

What diffsort accepts and fastssl's kernels cannot serve raises ``NotImplementedError`` when
the sorter is built, naming the option:

- ``size=1`` (diffsort returns the input unchanged; the kernels sort n >= 2 entries);
- a tensor ``steepness`` or ``art_lambda`` (diffsort differentiates through them; the kernels
  take Python numbers and give no gradient for them).

Unknown networks and distributions raise ``NotImplementedError`` too, as diffsort does (for
distributions already at construction, not at the first forward). Other differences: the
network tables follow the input's device, so ``device`` only places the
``sorting_network`` matrices kept for code that reads them, and inputs on another device are
accepted; ``forward`` also takes leading batch dimensions, (..., size); half-precision rows
are computed in float32; NaN or Inf rows raise ``ValueError`` instead of giving NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffsort.networks import get_sorting_network

from fastssl.integrations._patching import Patch
from fastssl.nn.diffsort import DiffSortNet as _FastDiffSortNet
from fastssl.reference.diffsort import DISTRIBUTIONS, NETWORKS

__all__ = ["DiffSortNet", "patch", "unpatch"]


class DiffSortNet(_FastDiffSortNet):
    """``DiffSortNet(sorting_network_type, size, device='cpu', steepness=10.0, art_lambda=0.25,
    interpolation_type=None, distribution='cauchy')(vectors)`` -> ``(sorted, P)``, as in diffsort.

    ``interpolation_type`` is diffsort's deprecated alias of ``distribution`` (setting both to
    different values is an error, as there). ``sorting_network`` holds diffsort's matrices on
    ``device``, built on first access; the kernels never read it.
    """

    def __init__(self, sorting_network_type: str, size: int, device: str = "cpu", steepness: float = 10.0,
                 art_lambda: float = 0.25, interpolation_type: Optional[str] = None,
                 distribution: Optional[str] = "cauchy"):
        distribution = _resolve_interpolation_type(distribution, interpolation_type)
        _raise_if_unsupported(sorting_network_type, size, steepness, art_lambda, distribution)
        super().__init__(sorting_network_type, size, steepness=steepness, art_lambda=art_lambda,
                         distribution=distribution)
        self._network_device = device
        self._sorting_network = None

    @property
    def sorting_network(self) -> list:
        if self._sorting_network is None:
            self._sorting_network = get_sorting_network(self.sorting_network_type, self.size, self._network_device)
        return self._sorting_network

    @sorting_network.setter
    def sorting_network(self, matrices: list) -> None:
        # Scripts move diffsort's matrices themselves (``net.sorting_network = [...]``); kept as given.
        self._sorting_network = matrices


def _resolve_interpolation_type(distribution: Optional[str], interpolation_type: Optional[str]) -> Optional[str]:
    if interpolation_type is None:
        return distribution
    if distribution not in (None, "cauchy", interpolation_type):
        raise ValueError(f"Two different distributions have been set (distribution={distribution} and "
                         f"interpolation_type={interpolation_type}); interpolation_type is diffsort's deprecated "
                         "name for distribution, set only one")
    return interpolation_type


def _raise_if_unsupported(network, size, steepness, art_lambda, distribution) -> None:
    if network not in NETWORKS:
        raise NotImplementedError(f"Sorting network `{network}` unknown; fastssl supports {', '.join(NETWORKS)}")
    if distribution not in DISTRIBUTIONS:
        raise NotImplementedError(f"distribution `{distribution}` unknown; fastssl supports "
                                  f"{', '.join(DISTRIBUTIONS)}")
    if size == 1:  # sizes below 1 are invalid for both and left to fastssl.nn.DiffSortNet's check
        raise NotImplementedError("size=1: fastssl's sorting kernels need size >= 2 (a single entry is already "
                                  "sorted: skip the sort, or use diffsort's own DiffSortNet)")
    for name, value in (("steepness", steepness), ("art_lambda", art_lambda)):
        if isinstance(value, torch.Tensor):
            raise NotImplementedError(f"a tensor {name} is not supported: fastssl's sorting kernels take it as a "
                                      f"Python number and give it no gradient; pass {name}=float(...) if it "
                                      "is not learned")


_PATCH = Patch({"diffsort.diffsort": {"DiffSortNet": DiffSortNet}})


def patch() -> Patch:
    """Make ``diffsort.DiffSortNet`` fastssl's; returns the Patch (a context manager that unpatches)."""
    return _PATCH.patch()


def unpatch() -> None:
    """Restore diffsort's ``DiffSortNet`` everywhere patch() replaced it."""
    _PATCH.unpatch()

