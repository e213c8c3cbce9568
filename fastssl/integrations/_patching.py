"""The patch()/unpatch() mechanism shared by the integrations.

Two ways in, one for code that has not built its modules yet and one for modules that exist:

- ``Patch({"lightly.loss": {"DINOLoss": DINOLoss}, ...}).patch()`` replaces those attributes
  of those modules; a key ``"module:Class"`` names a class in a module, whose attributes
  (methods, flags) are replaced the same way. A name bound earlier by ``from lightly.loss
  import DINOLoss`` in another module is a second reference to the original object, which
  setting the attribute does not reach, so ``patch()`` also rebinds every module-level name in
  ``sys.modules`` that refers to a replaced class or function of the upstream package itself
  (a user's script that imported the class before patching gets fastssl's too). Another
  package's function used by the upstream (an xformers helper DINOv2 imported) is replaced
  only where it is named. Plain values (a module's feature flag, or a name that an optional
  import would have defined and did not) are set only where they are named. ``unpatch()``
  restores exactly what ``patch()`` changed. Instances built before, and classes stored
  elsewhere (a dict, a closure), are not reached by it.
- ``swap_modules(model, swaps)`` turns the instances of upstream classes inside an existing
  model (``model.modules()``, the model included) into fastssl's classes by assigning their
  ``__class__``: the module object stays, with its parameters, buffers and submodules (the
  same tensors, so devices, ``requires_grad``, state-dict keys and an optimizer holding them
  are unchanged), and so do the references others hold to it (a parent module, DDP, a
  training loop's ``loss_fn``). ``swap_modules(model, swaps, to_fastssl=False)`` turns every
  fastssl instance back into the exact upstream class, whether it was swapped or built while
  patched.

Before changing anything, both check what they rely on and raise :class:`UpstreamMismatch`
(listing every problem, with the installed and the tested versions) or ``ValueError`` (a
module the kernels cannot serve), so that a failure leaves everything unpatched.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

_MISSING = object()


class UpstreamMismatch(RuntimeError):
    """The installed upstream package lacks a name fastssl replaces, or has changed its signature."""


@dataclass(frozen=True)
class Upstream:
    """An upstream package and the versions its integration was tested with (fnmatch patterns:
    ``"1.6.*"``)."""

    package: str  # the distribution name, for importlib.metadata
    tested: tuple[str, ...]

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "(version unknown)"

    def is_tested(self) -> bool:
        return any(fnmatch.fnmatch(self.version(), pattern) for pattern in self.tested)

    def mismatch(self, problems: Sequence[str]) -> UpstreamMismatch:
        tested = "tested" if self.is_tested() else "NOT among the tested versions"
        return UpstreamMismatch(
            f"fastssl.integrations cannot patch {self.package} {self.version()} ({tested}: "
            f"{', '.join(self.tested)}); nothing was patched:\n  " + "\n  ".join(problems))


class Patch:
    """Install replacements into upstream modules; a context manager that unpatches on exit.

    ``optional``: names a replacement may add where the upstream leaves them undefined (what an
    optional import would have defined); every other name must exist. ``requires``: names the
    integration uses without replacing them (``{"module:Class": ("method", ...)}``), checked too."""

    def __init__(self, replacements: dict[str, dict[str, Any]], upstream: Optional[Upstream] = None,
                 optional: Sequence[str] = (), requires: Optional[dict[str, Sequence[str]]] = None):
        self.replacements = replacements
        self.upstream = upstream
        self.optional = set(optional)
        self.requires = requires or {}
        self._saved: list[tuple[Any, str, Any]] = []  # (namespace, name, original value)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def check(self) -> None:
        """Raise :class:`UpstreamMismatch` naming every replaced name that is missing or whose
        signature fastssl's replacement does not take."""
        problems = []
        for target, attributes in [*self.replacements.items(), *self.requires.items()]:
            try:
                _resolve(target)
            except (ImportError, AttributeError) as error:
                problems.append(f"{target}: {error}")
                continue
            replacements = attributes if isinstance(attributes, dict) else dict.fromkeys(attributes, _MISSING)
            for name, replacement in replacements.items():
                original = self.original(target, name)
                if original is _MISSING:
                    if name not in self.optional:
                        problems.append(f"{target.replace(':', '.')} has no attribute {name!r}")
                elif replacement is not _MISSING and original is not replacement:
                    problems += signature_problems(f"{target}.{name}".replace(":", "."), original, replacement)
        if problems:
            package = next(iter(self.replacements)).split(".")[0]
            raise (self.upstream or Upstream(package, ())).mismatch(problems)

    def original(self, target: str, name: str) -> Any:
        """The upstream's value of ``target``'s attribute ``name`` (also while patched), or
        ``_MISSING``."""
        namespace = _resolve(target)
        for saved_namespace, saved_name, value in self._saved:
            if saved_namespace is namespace and saved_name == name:
                return value
        return namespace.__dict__.get(name, getattr(namespace, name, _MISSING))

    def patch(self) -> "Patch":
        if self.active:
            return self
        self.check()
        originals = {}
        for target, attributes in self.replacements.items():
            namespace = _resolve(target)
            for name, replacement in attributes.items():
                original = namespace.__dict__.get(name, getattr(namespace, name, _MISSING))
                if original is replacement:
                    continue
                package = target.split(".")[0].split(":")[0]
                upstream = isinstance(original, (type, types.FunctionType)) and \
                    getattr(original, "__module__", "").split(".")[0] == package
                if isinstance(namespace, type) or not upstream:
                    # a class attribute, a plain value (a flag) or another package's object used
                    # here: set where it is named only, restored by unpatch
                    self._saved.append((namespace, name, original))
                    setattr(namespace, name, replacement)
                if upstream:  # the upstream's own class or function: rebound wherever a module names it
                    originals[id(original)] = (original, replacement)
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or getattr(module, "__name__", "").startswith("fastssl."):
                continue
            for name, value in list(namespace.items()):
                if id(value) in originals and originals[id(value)][0] is value:
                    self._saved.append((module, name, value))
                    setattr(module, name, originals[id(value)][1])
        return self

    def unpatch(self) -> None:
        """Restore every attribute patch() changed (in reverse order)."""
        for namespace, name, original in reversed(self._saved):
            if original is _MISSING:  # an attribute patch() added (a name an optional import would define)
                delattr(namespace, name)
            else:
                setattr(namespace, name, original)
        self._saved.clear()

    def __enter__(self) -> "Patch":
        return self.patch()

    def __exit__(self, *exc_info) -> None:
        self.unpatch()


def _resolve(target: str):
    module_name, _, path = target.partition(":")
    namespace = importlib.import_module(module_name)
    for name in filter(None, path.split(".")):
        namespace = getattr(namespace, name)
    return namespace


# ----------------------------------------------------------------------------- signatures


def _parameter_names(function) -> Optional[list[str]]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return None
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _takes_the_same_arguments(where: str, original, replacement) -> list[str]:
    """The replacement must take the original's parameters, by name and in order (it may add
    more after them), so that every call written for the original binds the same way."""
    names, ours = _parameter_names(original), _parameter_names(replacement)
    if names is None or ours is None or ours[:len(names)] == names:
        return []
    return [f"{where} takes ({', '.join(names)}); fastssl's takes ({', '.join(ours)})"]


def _public_methods(cls: type) -> dict[str, Callable]:
    """Methods a user may call: defined by the class or its bases below torch's nn.Module."""
    methods = {}
    for base in reversed([b for b in cls.__mro__ if b.__module__.split(".")[0] not in ("torch", "builtins")]):
        methods.update({name: value for name, value in vars(base).items()
                        if isinstance(value, types.FunctionType) and not name.startswith("_")})
    return methods


def signature_problems(where: str, original, replacement) -> list[str]:
    """What of ``original`` (a class or function of the upstream) fastssl's ``replacement``
    does not reproduce: the constructor's or function's parameters, and for a class each
    public method's presence and parameters."""
    if isinstance(original, type) and isinstance(replacement, type):
        problems = _takes_the_same_arguments(where, original, replacement)
        ours = _public_methods(replacement)
        for name, method in _public_methods(original).items():
            if name not in ours and not hasattr(replacement, name):
                problems.append(f"{where}.{name} is not provided by fastssl's {replacement.__name__}")
            elif name in ours:
                problems += _takes_the_same_arguments(f"{where}.{name}", method, ours[name])
        return problems
    if callable(original) and callable(replacement) and not isinstance(original, type):
        return _takes_the_same_arguments(where, original, replacement)
    return []


# ----------------------------------------------------------------------------- existing modules


@dataclass(frozen=True)
class Swap:
    """Instances of exactly ``upstream`` become ``replacement`` (and back), in place.

    ``unservable(module)`` says why the kernels cannot serve this instance (None if they can);
    ``to_replacement`` / ``to_upstream`` move the instance's non-tensor state between the two
    classes' conventions, for classes whose attributes differ (parameters, buffers and
    submodules are never touched). They run after every check has passed and must not raise,
    or a model would be left half swapped."""

    upstream: type
    replacement: type
    unservable: Callable[[nn.Module], Optional[str]] = lambda module: None
    to_replacement: Callable[[nn.Module], None] = lambda module: None
    to_upstream: Callable[[nn.Module], None] = lambda module: None


def swap_modules(model: nn.Module, swaps: Sequence[Swap], to_fastssl: bool = True) -> nn.Module:
    """Swap the classes of ``model``'s modules (itself included) as ``swaps`` say; returns
    ``model``. Raises ``TypeError`` / ``ValueError`` before changing anything if a module
    cannot be swapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    by_class = {(swap.upstream if to_fastssl else swap.replacement): swap for swap in swaps}
    found, problems = [], []
    for name, module in model.named_modules():
        swap = by_class.get(type(module))
        if swap is None:
            problems += _sharded_problem(name or "the model", module, by_class)
            continue
        why_not = swap.unservable(module) if to_fastssl else None
        if why_not:
            problems.append(f"{name or 'the model'} ({type(module).__name__}): {why_not}")
        found.append((module, swap))
    if problems:
        raise ValueError("cannot swap these modules (nothing was changed):\n  " + "\n  ".join(problems))
    for module, swap in found:
        if to_fastssl:
            swap.to_replacement(module)
            module.__class__ = swap.replacement
        else:
            swap.to_upstream(module)
            module.__class__ = swap.upstream
    return model


def _sharded_problem(name: str, module: nn.Module, by_class: dict[type, Swap]) -> list[str]:
    """fully_shard(module) gives the module a class of its own (FSDP<Name>, a subclass of its
    class), which a swap would lose: refused with how to order the calls instead."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is None or not isinstance(module, fsdp_module):
        return []
    swapped = [cls for cls in type(module).__mro__ if cls in by_class]
    if not swapped:
        return []
    return [f"{name} ({swapped[0].__name__}) was passed to fully_shard itself, which changed its class: swap "
            "its modules before fully_shard (patch(model=...) first), or fully_shard only the modules "
            "that hold it"]
