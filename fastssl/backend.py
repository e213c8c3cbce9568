"""Which backend runs an op, and why the others cannot.

Backends, fastest first:

- ``cuda``: CUDA kernels in the native extension ``fastssl._C``.
- ``triton``: Triton kernels. They run on CUDA GPUs, and on the CPU only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which exists for tests.
- ``cpp``: C++ (OpenMP) CPU kernels in ``fastssl._C``.
- ``reference``: plain PyTorch, any device.

The default for a device is the first backend that can run the op there, in the op's
order of preference (the measured fastest first; :data:`BACKENDS` order otherwise); the
interpreter is never a default. Two overrides
exist, and both are strict: if the requested backend cannot run the op, the op raises
:class:`BackendUnavailableError` listing every backend and why it was rejected. There is
never a silent fallback from a requested backend.

- environment: ``FASTSSL_BACKEND=triton``
- code: ``fastssl.use_backend("triton")`` (for the rest of the program) or
  ``with fastssl.use_backend("triton"): ...`` (for the block only).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Mapping, Optional, Sequence

import torch

from fastssl import _native

BACKENDS = ("cuda", "triton", "cpp", "reference")

Reason = Optional[str]
"""``None`` when a backend can run, otherwise a sentence naming the missing piece."""

# A plain module global rather than a ContextVar: torch.compile guards on globals.
_requested: Optional[str] = None


class BackendUnavailableError(RuntimeError):
    """Raised when an op cannot run on the requested backend (or on any backend)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not_cuda(device: torch.device) -> Reason:
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if torch.version.hip is not None:
        return "fastssl._C's CUDA kernels are built for NVIDIA GPUs; on ROCm (AMD GPUs) the triton backend runs them"
    return _native.cuda_reason(device)


def _why_not_cpp(device: torch.device) -> Reason:
    if device.type != "cpu":
        return f"runs on the CPU, got {device.type}"
    return _native.cpp_reason()


def _why_not_triton(device: torch.device) -> Reason:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type in ("cuda", "meta"):  # on meta tensors (fastssl plan) the kernels' fakes give the shapes
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    if device.type == "cpu":
        return "runs on CUDA devices; on the CPU only under TRITON_INTERPRET=1 (tests)"
    return f"Triton does not support {device.type} tensors"


_DEVICE_CHECKS: Mapping[str, Callable[[torch.device], Reason]] = {
    "cuda": _why_not_cuda,
    "triton": _why_not_triton,
    "cpp": _why_not_cpp,
    "reference": lambda device: None,
}


def available_backends(device: torch.device | str | None = None) -> dict[str, Reason]:
    """Map each backend to ``None`` (usable on ``device``) or the reason it is not.

    ``device`` defaults to the current CUDA device when one exists, else the CPU.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return {name: _DEVICE_CHECKS[name](device) for name in BACKENDS}


class use_backend:
    """Request a backend for every op: as a call for the rest of the program, or as a
    context manager for one block (the previous request is restored on exit).

    ``use_backend(None)`` clears the request, returning to per-device defaults.
    """

    def __init__(self, name: Optional[str]):
        global _requested
        self._previous = _requested
        _requested = None if name is None else _check_name(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc_info) -> None:
        global _requested
        _requested = self._previous


def requested_backend() -> Optional[str]:
    """The backend requested by ``use_backend`` or else ``FASTSSL_BACKEND``, if any."""
    if _requested is not None:
        return _requested
    env = os.environ.get("FASTSSL_BACKEND", "").strip()
    if env:
        try:
            return _check_name(env)
        except ValueError as error:
            raise ValueError(f"FASTSSL_BACKEND: {error}") from None
    return None


def select_backend(
    op: str,
    device: torch.device,
    op_checks: Mapping[str, Callable[[], Reason]],
    preference: Sequence[str] = BACKENDS,
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``op_checks`` maps each backend the op implements to a function returning ``None`` or
    why this call (dtype, shape, ...) cannot run there; backends missing from it are
    rejected as not implemented for the op. Returns the requested backend, or the first
    usable one in ``preference`` order (backends left out of it are never defaults);
    raises :class:`BackendUnavailableError` naming every backend and its reason when that
    is impossible.
    """
    reasons: dict[str, Reason] = {}
    for name in BACKENDS:
        reason = _DEVICE_CHECKS[name](device)
        if reason is None:
            check = op_checks.get(name)
            reason = f"{op} has no {name} implementation" if check is None else check()
        reasons[name] = reason

    requested = requested_backend()
    if requested is not None:
        if reasons[requested] is None:
            return requested
        raise BackendUnavailableError(_explain(op, device, reasons, requested))
    for name in preference:
        # The Triton interpreter is a correctness tool, orders of magnitude slower than
        # PyTorch on the CPU, so it is never a CPU default; it must be requested.
        if reasons[name] is None and not (name == "triton" and device.type == "cpu"):
            return name
    raise BackendUnavailableError(_explain(op, device, reasons, None))


def _explain(op: str, device: torch.device, reasons: Mapping[str, Reason], requested) -> str:
    head = (
        f"{op}: backend {requested!r} was requested but cannot run on {device}"
        if requested
        else f"{op}: no backend can run on {device}"
    )
    lines = [f"  {name}: {reason or 'available'}" for name, reason in reasons.items()]
    return "\n".join([head, *lines])
