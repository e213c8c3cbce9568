"""Drop-in replacements installed into the packages people already train with.

One module per upstream package (``dinov2``, ``lightly``, ``timm``, ``diffsort``), each with
classes that keep the upstream's constructor, forward, methods, buffers and state-dict keys
(built on fastssl.nn and fastssl.ops), and ``patch()`` / ``unpatch()``, also usable as a
context manager, which install them into the upstream package in place::

    import fastssl.integrations.lightly
    fastssl.integrations.lightly.patch()      # lightly.loss.DINOLoss is now fastssl's
    with fastssl.integrations.lightly.patch():
        ...                                   # unpatched on leaving the block
    fastssl.integrations.lightly.patch(model=m)    # the lightly losses already in m, swapped in place
    fastssl.integrations.lightly.unpatch(model=m)  # and back

Each module lists the upstream versions it was tested with (``TESTED_VERSIONS``); on any
version ``patch()`` first checks the names it replaces and raises
:class:`UpstreamMismatch`, patching nothing, if one changed.

Importing this package imports no upstream package; each module imports its own when it is
imported.
"""

from fastssl.integrations._patching import UpstreamMismatch

__all__ = ["UpstreamMismatch"]
