"""Input checks shared by every op: clear errors naming the argument, raised before any
kernel runs."""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, value, *, min_dim: int = 1) -> None:
    """A non-empty floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}"
        )
    if value.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}"
        )
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def host_reads_are_free(value: torch.Tensor) -> bool:
    """Whether reading ``value``'s data on the host costs no synchronization: on the CPU,
    outside torch.compile's tracing, and with data to read (not a fake tensor, which memory
    planning runs the ops on)."""
    return value.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(value)


def check_finite(name: str, value: torch.Tensor, consequence: str = "") -> None:
    """NaN or Inf in ``value`` stops the op, naming it, without a host synchronization.

    On the CPU the values are read at once and a ValueError is raised. On a GPU reading them
    would stall the host on the device at every call, so the check is a device-side assert
    (``torch._assert_async``), queued with the op's kernels: the device prints the message,
    and the process gets a "device-side assert triggered" error at its next synchronization
    (with ``CUDA_LAUNCH_BLOCKING=1``, at the op itself). A failed assert stops the device's
    work, so nothing computed from the bad input reaches a result. Under torch.compile it is
    traced into the graph as the same assert."""
    message = f"{name} contains NaN or Inf" + (f"; {consequence}" if consequence else "")
    finite = torch.isfinite(value).all()
    if host_reads_are_free(value):
        if not bool(finite):
            raise ValueError(message)
    else:
        torch._assert_async(finite, message)
