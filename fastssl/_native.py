"""The native extension ``fastssl._C`` (csrc/ and kernels/), when this install built it.

Its launchers take raw pointers, sizes and the caller's CUDA stream; this module turns
checked tensors into those arguments. The extension is imported once, here, so that
backend selection only reads module globals (which torch.compile can trace).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/cpu_math.h


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module("fastssl._C"), None
    except ImportError as error:
        if getattr(error, "name", None) == "fastssl._C":
            return None, ("the native extension fastssl._C is not built in this install "
                          "(it needs a C++ compiler and CMake at install time)")
        return None, f"the native extension fastssl._C does not load: {error}"


_MODULE, _MISSING = _load()


def native() -> ModuleType:
    if _MODULE is None:
        raise RuntimeError(_MISSING)
    return _MODULE


def cpp_reason() -> Optional[str]:
    """Why the C++ CPU kernels cannot run, or None."""
    return _MISSING


def cuda_reason() -> Optional[str]:
    """Why the CUDA kernels cannot run, or None."""
    if _MODULE is None:
        return _MISSING
    return None if _MODULE.has_cuda else f"fastssl._C was {_MODULE.cuda_status}"


def dtype_reason(*tensors: torch.Tensor) -> Optional[str]:
    for tensor in tensors:
        if tensor.dtype not in DTYPE_CODES:
            return f"the native kernels take float32, bfloat16 or float16, got {tensor.dtype}"
    return None


def stream_of(tensor: torch.Tensor) -> int:
    """The current CUDA stream of ``tensor``'s device, as the launchers take it."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
