"""The patch()/unpatch() mechanism shared by the integrations.

``Patch({"lightly.loss": {"DINOLoss": DINOLoss}, ...})`` replaces those attributes of those
modules; a key ``"module:Class"`` names a class in a module, whose attributes (methods, flags)
are replaced the same way. A name bound earlier by ``from lightly.loss import DINOLoss`` in another module is
a second reference to the original object, which setting the attribute does not reach, so
``patch()`` also rebinds every module-level name in ``sys.modules`` that refers to a replaced
class or function of the upstream package itself (a user's script that imported the class
before patching gets fastssl's too). Another package's function used by the upstream (an
xformers helper DINOv2 imported) is replaced only where it is named.
Plain values (a module's feature flag, or a name that an optional import would have defined
and did not) are set only where they are named. ``unpatch()``
restores exactly what ``patch()`` changed. References held elsewhere (an
instance already built, a class stored in a dict or a closure) are not found: patch first,
then build the models and losses.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_MISSING = object()


class Patch:
    """Install replacements into upstream modules; a context manager that unpatches on exit."""

    def __init__(self, replacements: dict[str, dict[str, Any]]):
        self.replacements = replacements
        self._saved: list[tuple[Any, str, Any]] = []  # (namespace, name, original value)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def patch(self) -> "Patch":
        if self.active:
            return self
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
