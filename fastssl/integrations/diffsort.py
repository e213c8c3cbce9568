"""diffsort's ``DiffSortNet`` on fastssl's sorting kernels.

In a script that sorts with diffsort, add before the sorter is built::

    import fastssl.integrations.diffsort; fastssl.integrations.diffsort.patch()

or, for a sorter that exists already (or a model holding some),
``fastssl.integrations.diffsort.patch(model=sorter)``: its class becomes :class:`DiffSortNet`
below in place, keeping its ``sorting_network`` matrices; ``unpatch(model=sorter)`` makes it
diffsort's again.

Tested with diffsort 0.2.x (``TESTED_VERSIONS``; on another version patch() still checks
that ``DiffSortNet`` exists with the constructor and methods fastssl's takes, and raises
:class:`~fastssl.integrations.UpstreamMismatch` naming what changed otherwise).

``patch()`` replaces ``diffsort.DiffSortNet`` (the package's name, the one in ``diffsort.diffsort``
where it is defined, and any ``from diffsort import DiffSortNet`` already made) with
:class:`DiffSortNet` below: diffsort's constructor, forward, attributes and (empty) state
dict, computed by :func:`fastssl.ops.soft_sort` (the two-column kernels on every backend
instead of dense split/combine matrix products). ``unpatch()`` restores diffsort.

What diffsort accepts and fastssl's kernels cannot serve raises ``NotImplementedError`` when
the sorter is built, naming the option (``patch(model=...)`` refuses such a sorter with
``ValueError``, swapping nothing):

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

import diffsort.diffsort
import torch
from diffsort.networks import get_sorting_network
from torch import nn

from fastssl.integrations._patching import Patch, Swap, Upstream, swap_modules
from fastssl.nn.diffsort import DiffSortNet as _FastDiffSortNet
from fastssl.reference.diffsort import DISTRIBUTIONS, NETWORKS

__all__ = ["DiffSortNet", "TESTED_VERSIONS", "patch", "unpatch"]

TESTED_VERSIONS = ("0.2.*",)


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


_PATCH = Patch({"diffsort.diffsort": {"DiffSortNet": DiffSortNet}}, Upstream("diffsort", TESTED_VERSIONS))


def _unservable(sorter: nn.Module) -> Optional[str]:
    try:
        _raise_if_unsupported(sorter.sorting_network_type, sorter.size, sorter.steepness, sorter.art_lambda,
                              sorter.distribution)
    except NotImplementedError as error:
        return str(error)
    return None


def _to_fastssl(sorter: nn.Module) -> None:
    # diffsort keeps its matrices in the instance; fastssl's class serves them through a
    # property (built on demand), which would hide the instance attribute.
    matrices = sorter.__dict__.pop("sorting_network", None)  # None: built on first access
    sorter._sorting_network = matrices
    sorter._network_device = matrices[0][0].device if matrices and matrices[0] else "cpu"
    sorter.steepness, sorter.art_lambda = float(sorter.steepness), float(sorter.art_lambda)


def _to_diffsort(sorter: nn.Module) -> None:
    sorter.__dict__["sorting_network"] = sorter.sorting_network  # built now if it never was
    del sorter._sorting_network, sorter._network_device


# getattr: a diffsort without the class fails patch()'s check, with the message, not this import.
_SWAPS = [Swap(getattr(diffsort.diffsort, "DiffSortNet", None), DiffSortNet, _unservable, _to_fastssl, _to_diffsort)]


def patch(model: Optional[nn.Module] = None):
    """Without ``model``: make ``diffsort.DiffSortNet`` fastssl's; returns the Patch (a context
    manager that unpatches). With ``model`` (a built ``DiffSortNet`` or a module holding some):
    turn its diffsort sorters into fastssl's in place; returns ``model``."""
    if model is None:
        return _PATCH.patch()
    _PATCH.check()
    return swap_modules(model, _SWAPS)


def unpatch(model: Optional[nn.Module] = None):
    """Without ``model``: restore diffsort's ``DiffSortNet`` everywhere patch() replaced it.
    With ``model``: turn its fastssl sorters back into diffsort's, in place; returns ``model``."""
    if model is None:
        _PATCH.unpatch()
        return None
    return swap_modules(model, _SWAPS, to_fastssl=False)
