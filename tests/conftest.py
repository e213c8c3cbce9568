"""Test harness shared by every op.

- Without a CUDA device the Triton interpreter is enabled (before triton is imported), so
  the kernels run on the CPU.
- ``@pytest.mark.gpu`` tests need CUDA and are skipped without it; ``pytest -m gpu`` runs them.
- Every test gets a fresh random seed (printed on failure; set FASTSSL_TEST_SEED to replay).

The interpreter truncates float32 -> bfloat16 conversions (even with
``fp_downcast_rounding="rtne"``; seen with triton 3.8) where GPUs round to nearest even. So
kernels round to bfloat16 only when storing an output, which the tests allow one bfloat16
unit for (``accuracy.output_rounding``), and do arithmetic on float32 values.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    value = int(os.environ.get("FASTSSL_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call" and report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"replay with FASTSSL_TEST_SEED={value}"))


@pytest.fixture
def poisoned_outputs():
    """Make torch.empty return NaN-filled memory, so a kernel that leaves part of its
    output unwritten fails the accuracy checks instead of passing on lucky zeros."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def kernel_devices():
    """Where the Triton kernels run: the CPU under the interpreter, and CUDA (marked gpu)."""
    return [
        pytest.param("cpu", id="cpu-interpreter"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]


@pytest.fixture
def kernel_device(request):
    device = request.param
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton interpreter is off (a CUDA device is present)")
    return device


def kernel_backends(native: bool = False):
    """(backend, device) pairs that run an op's kernels: Triton on the CPU (interpreter) and
    on CUDA, and with ``native`` the kernels of fastssl._C (C++ on the CPU, CUDA)."""
    params = [
        pytest.param(("triton", "cpu"), id="triton-interpreter"),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    ]
    if native:
        params += [
            pytest.param(("cpp", "cpu"), id="cpp"),
            pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
        ]
    return params


@pytest.fixture
def kernel_backend(request):
    backend, device = request.param
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton interpreter is off (a CUDA device is present)")
    return backend, device

