import shutil

import pytest
import torch

import fastssl
from fastssl.backend import BackendUnavailableError, requested_backend, select_backend


def test_available_backends_names_every_backend_with_a_reason():
    reasons = fastssl.available_backends("cpu")
    assert set(reasons) == set(fastssl.BACKENDS)
    assert reasons["reference"] is None
    assert reasons["cuda"] == "needs a CUDA device, got cpu"
    assert reasons["triton"] is None  # the interpreter is on in CPU-only test runs
    assert reasons["cpp"] is None  # fastssl._C is built by the install


def test_use_backend_as_context_manager_restores_the_previous_request():
    assert requested_backend() is None
    with fastssl.use_backend("triton"):
        assert requested_backend() == "triton"
        with fastssl.use_backend("reference"):
            assert requested_backend() == "reference"
        assert requested_backend() == "triton"
    assert requested_backend() is None


def test_use_backend_as_a_call_persists_until_cleared():
    fastssl.use_backend("reference")
    try:
        assert requested_backend() == "reference"
    finally:
        fastssl.use_backend(None)
    assert requested_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    assert requested_backend() == "triton"
    with fastssl.use_backend("reference"):  # code overrides the environment
        assert requested_backend() == "reference"
    monkeypatch.setenv("FASTSSL_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND: unknown backend 'fast'"):
        requested_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        fastssl.use_backend("cudnn")


def test_requested_backend_is_never_silently_replaced():
    checks = {"triton": lambda: "head_dim 96 is not supported", "reference": lambda: None}
    with fastssl.use_backend("triton"), pytest.raises(BackendUnavailableError) as info:
        select_backend("toy_op", torch.device("cpu"), checks)
    lines = str(info.value).splitlines()
    assert lines[0] == "toy_op: backend 'triton' was requested but cannot run on cpu"
    assert lines[1] == "  cuda: needs a CUDA device, got cpu"
    assert lines[2] == "  triton: head_dim 96 is not supported"
    assert lines[3] == "  cpp: toy_op has no cpp implementation"
    assert lines[4] == "  reference: available"


def test_backend_missing_from_an_op_is_explained():
    with fastssl.use_backend("triton"), pytest.raises(BackendUnavailableError, match="toy_op has no triton"):
        select_backend("toy_op", torch.device("cpu"), {"reference": lambda: None})


def test_default_is_the_first_usable_backend():
    assert select_backend("toy_op", torch.device("cpu"), {"reference": lambda: None}) == "reference"


def test_preference_orders_the_defaults_and_never_picks_the_interpreter():
    checks = {name: (lambda: None) for name in fastssl.BACKENDS}
    cpu = torch.device("cpu")
    assert select_backend("toy_op", cpu, checks, preference=("triton", "cpp", "reference")) == "cpp"
    assert select_backend("toy_op", cpu, checks, preference=("reference", "cpp")) == "reference"


def test_native_extension_is_built_by_the_install():
    # The README's install builds fastssl._C whenever a C++ compiler and CMake exist (as in CI).
    from fastssl import _native

    assert _native.cpp_reason() is None
    assert "CUDA" in _native.native().cuda_status
    if shutil.which("nvcc"):  # for every NVIDIA target of fastssl.devices this nvcc builds (13: not sm_70)
        for capability in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
            assert _native.runs_on(_native.native().cuda_archs, capability), capability


def test_missing_native_extension_is_explained(monkeypatch):
    from fastssl import _native

    monkeypatch.setattr(_native, "_MODULE", None)
    monkeypatch.setattr(_native, "_MISSING", "the native extension fastssl._C is not built here")
    reasons = fastssl.available_backends("cpu")
    assert reasons["cpp"] == "the native extension fastssl._C is not built here"
    assert fastssl.available_backends("cuda")["cuda"] == "the native extension fastssl._C is not built here"
