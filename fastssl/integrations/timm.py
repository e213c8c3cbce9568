"""timm ViTs with fastssl's attention.

In a script that builds timm ViTs, add before the models are built::

    import fastssl.integrations.timm; fastssl.integrations.timm.patch()

or, for a model that exists already (built, loaded from a checkpoint, compiled, wrapped in
DDP or sharded with ``fully_shard``)::

    fastssl.integrations.timm.patch(model=vit)    # its Attention layers become fastssl's, in place
    fastssl.integrations.timm.unpatch(model=vit)  # and timm's again

The second form swaps the class of each timm ``Attention`` module of ``vit``: the module
objects, their parameters and buffers (and so the state-dict keys, devices and an optimizer
holding them) stay; see :mod:`fastssl.integrations._patching` and the README for the orders
with torch.compile, DDP and FSDP2 that work. A layer the kernels cannot serve (gated, or with
``attn_head_dim`` / ``dim_out`` of its own) raises ``ValueError`` naming it, before anything
is swapped.

Tested with (``TESTED_VERSIONS``; on another version patch() still checks every name it
replaces and raises :class:`~fastssl.integrations.UpstreamMismatch` naming what
changed, patching nothing):

======== ===============
timm     1.0.x
======== ===============

Every attention layer timm would build as its ``Attention`` (``timm.layers.Attention``) is then
:class:`Attention` below: a :class:`fastssl.nn.MultiCropAttention` (fastssl's varlen attention
kernels; :class:`fastssl.nn.PackedViT` runs such a ViT over all crop resolutions at once) with
timm's constructor, forward, attributes and state-dict keys, so checkpoints load either way.

timm finds ``Attention`` in three kinds of places, and patch() replaces it in each:

- module-level names (``timm.layers.Attention``, ``timm.layers.attention.Attention``,
  ``timm.models.vision_transformer.Attention``, any ``from timm.layers import Attention``):
  rebound by the shared mechanism of :mod:`fastssl.integrations._patching`;
- default arguments, such as ``attn_layer=Attention`` of ``VisionTransformer``, ``Block``,
  ``ResPostBlock`` and ``ParallelThingsBlock``: Python evaluated them once, when the
  function was defined, so rebinding the module name does not reach them. patch() replaces
  the ``__defaults__`` / ``__kwdefaults__`` tuples of every timm function and method whose
  defaults hold timm's ``Attention``;
- registries mapping names to classes (``ATTN_LAYERS``, where ``attn_layer=''`` or
  ``'attn'`` is looked up): replaced by copies that map those names to :class:`Attention`.

unpatch() restores all of them. Models built before patch() keep timm's layers: give them
to ``patch(model=...)``.

timm options the kernels cannot serve raise ``ValueError`` when the layer is built, naming
them: ``attn_head_dim`` other than ``dim // num_heads``, ``dim_out`` other than ``dim``, and
``gated``; there is no silent fallback to timm's layer. The module-level rebinding reaches
every timm model that names ``Attention``, not only ViTs: csatv2, for one, sets
``attn_head_dim`` and so raises while timm is patched. Attention dropout runs only with a
mask (PyTorch's SDPA path): without one, a training-mode layer with ``attn_drop > 0``
raises at its forward rather than skip the dropout. Build such models before patch() or
after unpatch().
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Iterator, Optional

import timm.models  # noqa: F401  (every model module, so that patch() finds their defaults)
from timm.layers import attention as timm_attention
from timm.layers.config import use_fused_attn
from torch import nn

from fastssl.integrations._patching import Patch, Swap, Upstream, swap_modules
from fastssl.nn.attention import MultiCropAttention

__all__ = ["Attention", "TESTED_VERSIONS", "patch", "unpatch"]

TESTED_VERSIONS = ("1.0.*",)

_TIMM_ATTENTION = timm_attention.Attention
_TIMM_SIGNATURE = inspect.signature(_TIMM_ATTENTION)
_MULTICROP_PARAMETERS = inspect.signature(MultiCropAttention).parameters


class Attention(MultiCropAttention):
    """timm's ``Attention`` on fastssl's kernels: the installed timm's constructor (the same
    arguments in the same order; timm has reordered them between releases, so positional
    calls are bound against timm's own signature), ``forward(x, attn_mask=None,
    is_causal=False)``, state-dict keys and the attributes ``num_heads``, ``head_dim``,
    ``attn_dim``, ``scale``, ``fused_attn`` and ``gate`` (None)."""

    __signature__ = _TIMM_SIGNATURE

    def __init__(self, *args: Any, **kwargs: Any):
        options = _TIMM_SIGNATURE.bind(*args, **kwargs)  # a TypeError for what timm's Attention does not take
        options.apply_defaults()
        super().__init__(**_multicrop_options(options.arguments))
        self.attn_dim = self.num_heads * self.head_dim
        self.fused_attn = use_fused_attn()  # read by code that switches timm's attention paths; unused here
        self.gate = None


def _multicrop_options(timm_options: dict[str, Any]) -> dict[str, Any]:
    """timm's arguments as MultiCropAttention's keywords; a ValueError naming those the
    kernels cannot serve."""
    unsupported = _unsupported_options(timm_options)
    if unsupported:
        settings = ", ".join(f"{name}={timm_options[name]!r}" for name in unsupported)
        raise ValueError(f"fastssl's timm Attention cannot serve {settings} (its heads split dim evenly, its "
                         "output has dim channels and it has no gate); build this model with timm's own "
                         "Attention, after fastssl.integrations.timm.unpatch()")
    return {name: value for name, value in timm_options.items() if name in _MULTICROP_PARAMETERS}


def _unsupported_options(options: dict[str, Any]) -> list[str]:
    dim, num_heads = options["dim"], options["num_heads"]
    unsupported = [name for name, served in (
        ("attn_head_dim", options.get("attn_head_dim") in (None, dim // num_heads)),
        ("dim_out", options.get("dim_out") in (None, 0, dim)),  # timm reads dim_out or dim
        ("gated", not options.get("gated")),
    ) if not served]
    # An argument of a newer timm that MultiCropAttention does not know is served only at its default.
    return unsupported + [name for name, value in options.items() if name not in _MULTICROP_PARAMETERS
                          and value != _TIMM_SIGNATURE.parameters[name].default]


# ----------------------------------------------------------------------------- what patch() replaces


def _timm_modules() -> list[types.ModuleType]:
    return [module for name, module in list(sys.modules.items())
            if (name == "timm" or name.startswith("timm.")) and isinstance(module, types.ModuleType)]


def _with_attention_replaced(values):
    return type(values)(Attention if value is _TIMM_ATTENTION else value for value in values)


def _defaults_replacing_attention(function: types.FunctionType) -> dict[str, Any]:
    """New ``__defaults__`` / ``__kwdefaults__`` of ``function`` where they hold timm's Attention."""
    defaults = {}
    if any(value is _TIMM_ATTENTION for value in function.__defaults__ or ()):
        defaults["__defaults__"] = _with_attention_replaced(function.__defaults__)
    keyword_defaults = function.__kwdefaults__ or {}
    if any(value is _TIMM_ATTENTION for value in keyword_defaults.values()):
        defaults["__kwdefaults__"] = {name: Attention if value is _TIMM_ATTENTION else value
                                      for name, value in keyword_defaults.items()}
    return defaults


def _functions_defined_in(module: types.ModuleType) -> Iterator[tuple[str, types.FunctionType]]:
    """(``"module:path"`` for Patch, function) of the module's functions and its classes' methods."""
    for name, value in vars(module).items():
        if getattr(value, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: found in its own module
        if isinstance(value, types.FunctionType):
            yield f"{module.__name__}:{name}", value
        elif isinstance(value, type):
            for method_name, method in vars(value).items():
                if isinstance(method, types.FunctionType):
                    yield f"{module.__name__}:{name}.{method_name}", method


def _registries_replacing_attention(module: types.ModuleType, copies: dict[int, dict]) -> dict[str, dict]:
    """Module-level dicts that map names to timm's Attention, as copies mapping them to ours
    (one copy per dict, however many modules name it)."""
    registries = {}
    for name, value in vars(module).items():
        if isinstance(value, dict) and any(entry is _TIMM_ATTENTION for entry in value.values()):
            if id(value) not in copies:
                copies[id(value)] = {key: Attention if entry is _TIMM_ATTENTION else entry
                                     for key, entry in value.items()}
            registries[name] = copies[id(value)]
    return registries


def _replacements() -> dict[str, dict[str, Any]]:
    replacements: dict[str, dict[str, Any]] = {timm_attention.__name__: {"Attention": Attention}}
    registry_copies: dict[int, dict] = {}
    for module in _timm_modules():
        registries = _registries_replacing_attention(module, registry_copies)
        if registries:
            replacements.setdefault(module.__name__, {}).update(registries)
        for path, function in _functions_defined_in(module):
            defaults = _defaults_replacing_attention(function)
            if defaults:
                replacements[path] = defaults
    return replacements

_PATCH = Patch(_replacements(), Upstream("timm", TESTED_VERSIONS))


def _unservable(attention: nn.Module) -> Optional[str]:
    """Why fastssl's Attention cannot take over this built timm Attention (None if it can):
    the options :func:`_unsupported_options` refuses at construction, read off the instance."""
    dim = attention.qkv.in_features
    if getattr(attention, "gate", None) is not None:
        return "it is gated"
    if attention.num_heads * attention.head_dim != dim:
        return f"its heads ({attention.num_heads} x {attention.head_dim}) do not split dim={dim} evenly"
    if attention.proj.out_features != dim:
        return f"its output has {attention.proj.out_features} channels, not dim={dim}"
    return None


def _add_attributes_of_newer_timm(attention: nn.Module) -> None:
    # timm releases before 1.0.20 did not set these; fastssl's Attention reads them.
    for name, value in (("attn_dim", attention.num_heads * attention.head_dim), ("gate", None),
                        ("fused_attn", use_fused_attn())):
        if not hasattr(attention, name):
            setattr(attention, name, value)


_SWAPS = [Swap(_TIMM_ATTENTION, Attention, _unservable, _add_attributes_of_newer_timm)]


def patch(model: Optional[nn.Module] = None):
    """Without ``model``: make timm build fastssl's :class:`Attention`; returns the Patch (a
    context manager that unpatches). With ``model`` (built already, compiled, DDP-wrapped or
    sharded): turn its timm ``Attention`` layers into fastssl's in place, keeping their
    parameters; returns ``model``."""
    if model is None:
        return _PATCH.patch()
    _PATCH.check()
    return swap_modules(model, _SWAPS)


def unpatch(model: Optional[nn.Module] = None):
    """Without ``model``: restore timm's ``Attention`` everywhere patch() replaced it. With
    ``model``: turn its fastssl Attention layers (swapped or built while patched) back into
    timm's, in place; returns ``model``."""
    if model is None:
        _PATCH.unpatch()
        return None
    return swap_modules(model, _SWAPS, to_fastssl=False)
