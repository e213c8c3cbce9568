"""The components of a training step that fastssl replaces, and how profiled time is
attributed to them.

**attention** is the softmax attention itself (SDPA on the original path,
:func:`fastssl.ops.varlen_attention` on fastssl's, not the projections around it), **loss**
everything a method's loss computes from the networks' outputs, **sorting** the
differentiable sorting networks inside NeCo's loss. The rest of a step (the other layers,
heads, optimizer, EMA update, idle time) is what remains of the step time.

fastssl code marks them with the named ranges below
(``torch.profiler.record_function``; a few microseconds each when no profiler runs);
SDPA is recognized by its op names. Ranges nest, and the innermost one wins: the sorting
inside NeCo's loss counts as sorting. A range covers the forward ops run inside it; their
backward ops run later, outside any range, and are attributed through autograd's sequence
numbers: the profiler tags each forward op and each backward node with the number of the
autograd node, so a backward node takes the component of the forward op that created it.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

ATTENTION, LOSS, SORTING = "fastssl.attention", "fastssl.loss", "fastssl.sorting"
COMPONENTS = ("attention", "loss", "sorting")

_RANGE_COMPONENTS = {ATTENTION: "attention", LOSS: "loss", SORTING: "sorting"}
_BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


def _named_component(event) -> Optional[str]:
    if event.name in _RANGE_COMPONENTS:
        return _RANGE_COMPONENTS[event.name]
    if "scaled_dot_product" in event.name:  # aten SDPA ops and their backward kernels
        return "attention"
    return None


def _ancestors(event) -> Iterator:
    """The event, then its enclosing CPU events, innermost first."""
    while event is not None:
        yield event
        event = event.cpu_parent


def _forward_components(events: list) -> dict[tuple[int, int], Optional[str]]:
    """(thread, sequence number) -> component of the forward op tagged with it. Ops that
    create no autograd node carry the next node's number, so the latest op wins."""
    components: dict[tuple[int, int], Optional[str]] = {}
    for event in sorted(events, key=lambda e: e.time_range.start):
        chain = list(_ancestors(event))
        if event.sequence_nr >= 0 and not any(a.name.startswith(_BACKWARD_PREFIX) for a in chain):
            components[(event.thread, event.sequence_nr)] = next(filter(None, map(_named_component, chain)), None)
    return components


def _component(event, forward_components: dict) -> Optional[str]:
    for ancestor in _ancestors(event):
        named = _named_component(ancestor)
        if named is not None:
            return named
        if ancestor.name.startswith(_BACKWARD_PREFIX):
            return forward_components.get((ancestor.fwd_thread, ancestor.sequence_nr))
    return None


def event_components(events: Iterable) -> list[tuple[object, Optional[str]]]:
    """Each CPU-side event of a profile (``torch.profiler.profile().events()``) with the
    component its own time counts toward (None: no component)."""
    events = [event for event in events if event.device_type.name == "CPU"]
    forward_components = _forward_components(events)
    return [(event, _component(event, forward_components)) for event in events]


def component_times_us(events: Iterable, device_time: bool) -> dict[str, float]:
    """Microseconds of each component in a profile: the time of the device kernels its ops
    launched when ``device_time``, else its ops' own CPU time."""
    totals = dict.fromkeys(COMPONENTS, 0.0)
    for event, component in event_components(events):
        if component is not None:
            totals[component] += event.self_device_time_total if device_time else event.self_cpu_time_total
    return totals
