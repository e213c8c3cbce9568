"""Soft sort and the fused NeCo loss on the kernels of ``fastssl._C``: C++ (OpenMP) on the
CPU (csrc/soft_sort_cpu.cpp), CUDA on a GPU (kernels/soft_sort.cu).

Same semantics as :func:`fastssl.reference.diffsort.soft_sort_reference` and
:func:`fastssl.reference.neco.neco_loss_rows_reference` on (R, n) rows of float32, bfloat16 or
float16 with any strides; the kernels compute in float32 and return float32 (the caller casts).
The backward functions recompute the forward from the input rows: nothing else is kept.

- CPU: a thread per row holds the values and P (n x n, wire-major) and applies each
  comparator as a two-column update; the backward keeps (x, P) before every layer when the
  L states fit 8 MiB per thread, else checkpoints every ceil(sqrt(L)) layers.
- CUDA: a block per (row, tile of 4096 / N input rows) with P in shared memory for the forward;
  the backward runs persistent blocks (two per SM) with checkpoints in a global workspace and
  ends with the values' backward through F'. N = next power of two >= n up to 256.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from fastssl import _native
from fastssl.reference.diffsort import (
    DISTRIBUTIONS,
    check_distribution,
    network_codes,
    network_codes_tensor,
    padded_size,
)

MAX_WIRES_CUDA = 256  # csrc/kernels_api.h: SOFT_SORT_MAX_WIRES_CUDA


def why_not_native(x: torch.Tensor, n: int) -> Optional[str]:
    """Why the native kernels cannot sort rows of length ``n`` like ``x``, or None."""
    if x.device.type == "cuda":
        reason = _native.cuda_reason(x.device)
        if reason is None and padded_size(n) > MAX_WIRES_CUDA:
            reason = (f"the CUDA kernels hold a row's wires in one thread block, up to n = {MAX_WIRES_CUDA}; "
                      f"got n = {n}")
    elif x.device.type == "cpu":
        reason = _native.cpp_reason()
    else:
        reason = f"the native kernels run on CPU or CUDA tensors, got device {x.device}"
    return reason or _native.dtype_reason(x)


def _rows_view(C, rows: Optional[torch.Tensor], like: torch.Tensor):
    """A RowsView of (R, n) rows; data 0 (absent) for None."""
    if rows is None:
        return C.RowsView(0, 0, like.shape[0], like.shape[1], 0, 0)
    _check_like("rows", rows, like, like.shape)
    return C.RowsView(rows.data_ptr(), _native.DTYPE_CODES[rows.dtype], rows.shape[0], rows.shape[1], *rows.stride())


def _matrices_view(C, matrices: Optional[torch.Tensor], like: torch.Tensor):
    R, n = like.shape
    if matrices is None:
        return C.MatricesView(0, 0, R, n, 0, 0, 0)
    _check_like("grad_P", matrices, like, (R, n, n))
    return C.MatricesView(matrices.data_ptr(), _native.DTYPE_CODES[matrices.dtype], R, n, *matrices.stride())


def _check_like(name: str, tensor: torch.Tensor, like: torch.Tensor, shape) -> None:
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {tensor.device}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype not in _native.DTYPE_CODES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def _check_rows(name: str, x: torch.Tensor) -> int:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (rows, n), got shape {tuple(x.shape)}")
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"{name} must have n >= 2 entries per row, got shape {tuple(x.shape)}")
    reason = why_not_native(x, n)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    return n


def _network(C, network: str, distribution: str, n: int, art_lambda: float, device: torch.device):
    """The SortingNetwork argument and the code table it points to (keep it alive)."""
    codes = network_codes_tensor(network, n, device)
    distribution_id = DISTRIBUTIONS.index(check_distribution(distribution))
    return C.SortingNetwork(codes.data_ptr(), codes.shape[0], codes.shape[1], distribution_id, float(art_lambda)), codes


def _device_scope(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _workspace(C, rows: int, net, device: torch.device) -> torch.Tensor:
    return torch.empty(C.soft_sort_workspace_floats_cuda(rows, net), dtype=torch.float32, device=device)


def soft_sort_forward_native(x: torch.Tensor, steepness: float, network: str, distribution: str,
                             art_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_sorted (R, n), P (R, n, n))`` in float32 for rows ``x`` of shape (R, n)."""
    n = _check_rows("x", x)
    C = _native.native()
    rows = x.shape[0]
    x_sorted = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    P = torch.empty((rows, n, n), dtype=torch.float32, device=x.device)
    with _device_scope(x):
        net, _codes = _network(C, network, distribution, n, art_lambda, x.device)
        view = _rows_view(C, x, x)
        if x.is_cuda:
            C.soft_sort_forward_cuda(view, net, float(steepness), x_sorted.data_ptr(), P.data_ptr(),
                                     _native.stream_of(x))
        else:
            C.soft_sort_forward_cpu(view, net, float(steepness), x_sorted.data_ptr(), P.data_ptr())
    return x_sorted, P


def soft_sort_backward_native(x: torch.Tensor, grad_sorted: Optional[torch.Tensor], grad_P: Optional[torch.Tensor],
                              steepness: float, network: str, distribution: str, art_lambda: float) -> torch.Tensor:
    """dL/dx (R, n) float32 from the gradients of x_sorted (R, n) and P (R, n, n); either may be
    None (zero). Any float dtype the kernels take and any strides."""
    n = _check_rows("x", x)
    C = _native.native()
    grad_x = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    with _device_scope(x):
        net, _codes = _network(C, network, distribution, n, art_lambda, x.device)
        views = (_rows_view(C, x, x), _rows_view(C, grad_sorted, x), _matrices_view(C, grad_P, x))
        if x.is_cuda:
            workspace = _workspace(C, x.shape[0], net, x.device)
            C.soft_sort_backward_cuda(*views, net, float(steepness), grad_x.data_ptr(), workspace.data_ptr(),
                                      _native.stream_of(x))
        else:
            C.soft_sort_backward_cpu(*views, net, float(steepness), grad_x.data_ptr())
    return grad_x


def native_backward_fake(x: torch.Tensor, network: str, art_lambda: float, backend: str) -> torch.Tensor:
    """What a native backward (soft sort's or NeCo's) allocates, for the ops' fakes: the
    float32 gradient, on a GPU the kernels' checkpoint workspace while they run (sized by the
    extension from the shapes alone), and the gradient's cast to x's dtype."""
    grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if backend == "cuda":
        C = _native.native()
        codes = network_codes(network, x.shape[1])  # sizes only: no table on the device
        net = C.SortingNetwork(0, codes.shape[0], codes.shape[1], 0, float(art_lambda))
        _workspace(C, x.shape[0], net, x.device)
    return grad_x.to(x.dtype)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> int:
    n = _check_rows("student", student)
    _check_rows("teacher", teacher)
    _check_like("teacher", teacher, student, student.shape)
    return n


def neco_loss_forward_native(student: torch.Tensor, teacher: torch.Tensor, steepness_student: float,
                             steepness_teacher: float, network: str, distribution: str,
                             art_lambda: float) -> torch.Tensor:
    """Per-row NeCo losses ``-(1/n) sum_ij P_t log(max(P_s, 2^-149))`` (R,) float32 of (R, n)
    rows (:func:`fastssl.reference.neco.neco_loss_rows_reference`); P is never written."""
    n = _check_pair(student, teacher)
    C = _native.native()
    loss = torch.empty((student.shape[0],), dtype=torch.float32, device=student.device)
    with _device_scope(student):
        net, _codes = _network(C, network, distribution, n, art_lambda, student.device)
        args = (_rows_view(C, student, student), _rows_view(C, teacher, student), net, float(steepness_student),
                float(steepness_teacher), loss.data_ptr())
        if student.is_cuda:
            C.neco_loss_forward_cuda(*args, _native.stream_of(student))
        else:
            C.neco_loss_forward_cpu(*args)
    return loss


def neco_loss_backward_native(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                              steepness_student: float, steepness_teacher: float, network: str, distribution: str,
                              art_lambda: float) -> torch.Tensor:
    """dL/dstudent (R, n) float32 from the upstream gradient of the per-row losses ``grad_rows``
    (R,); the teacher gets none."""
    n = _check_pair(student, teacher)
    if grad_rows.shape != (student.shape[0],) or grad_rows.device != student.device:
        raise ValueError(f"grad_rows must have shape ({student.shape[0]},) on {student.device}, "
                         f"got {tuple(grad_rows.shape)} on {grad_rows.device}")
    C = _native.native()
    grad_rows = grad_rows.to(torch.float32).contiguous()
    grad_student = torch.empty((student.shape[0], n), dtype=torch.float32, device=student.device)
    with _device_scope(student):
        net, _codes = _network(C, network, distribution, n, art_lambda, student.device)
        args = (_rows_view(C, student, student), _rows_view(C, teacher, student), net, float(steepness_student),
                float(steepness_teacher), grad_rows.data_ptr(), grad_student.data_ptr())
        if student.is_cuda:
            workspace = _workspace(C, student.shape[0], net, student.device)
            C.neco_loss_backward_cuda(*args, workspace.data_ptr(), _native.stream_of(student))
        else:
            C.neco_loss_backward_cpu(*args)
    return grad_student
