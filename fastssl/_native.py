"""The native extension ``fastssl._C`` (csrc/ and kernels/), when this install built it.

Its launchers take raw pointers, sizes and the caller's CUDA stream; this module turns
checked tensors into those arguments. The extension is imported once, here, so that
backend selection only reads module globals (which torch.compile can trace).
"""

from __future__ import annotations

import functools
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


def runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for CMake's CUDA_ARCHITECTURES ``archs`` ("75-real,80-real,120") runs
    on a GPU of compute capability ``capability``: a binary runs on its own major version at
    the same or a later minor one; PTX (an arch without "-real") on any later GPU."""
    major, minor = capability
    for arch in filter(None, archs.split(",")):
        number = int(arch.split("-")[0])
        if number // 10 == major and number % 10 <= minor:
            return True
        if not arch.endswith("-real") and number <= 10 * major + minor:
            return True
    return False


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the CUDA kernels cannot run on ``device`` (a CUDA device), or None; without a
    device, why they cannot run on any (not built, or built without CUDA)."""
    if _MODULE is None:
        return _MISSING
    if not _MODULE.has_cuda:
        return f"fastssl._C was {_MODULE.cuda_status}"
    if device is None:
        return None
    capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if not runs_on(_MODULE.cuda_archs, capability):
        return (f"fastssl._C was {_MODULE.cuda_status}, which does not run on this sm_{capability[0]}{capability[1]} "
                f"GPU; reinstall with FASTSSL_CUDA_ARCHS={capability[0]}{capability[1]} (an nvcc that builds it)")
    return None


def dtype_reason(*tensors: torch.Tensor) -> Optional[str]:
    for tensor in tensors:
        if tensor.dtype not in DTYPE_CODES:
            return f"the native kernels take float32, bfloat16 or float16, got {tensor.dtype}"
    return None


def stream_of(tensor: torch.Tensor) -> int:
    """The current CUDA stream of ``tensor``'s device, as the launchers take it."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
