"""fastssl: fused Triton/CUDA kernels for self-supervised vision training.

Layers: ``fastssl.ops`` (functional API dispatching on backend), ``fastssl.nn`` (drop-in
modules), ``fastssl.reference`` (plain-PyTorch ground truth). See README.md.
"""

from fastssl.backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    use_backend,
)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "use_backend", "__version__"]
