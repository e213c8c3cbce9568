"""fastssl.devices: the facts of every target, of a real GPU (from its properties, also under
ROCm) and of FASTSSL_TARGET; and what they decide outside the kernels (the trainer's
autocast, the backends)."""

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastssl
from fastssl import _native
from fastssl.devices import ARCHITECTURES, DEFAULT_TARGET, TARGETS, requested_target, target_of
from fastssl.train.config import TrainConfig
from fastssl.train.loop import step_precision

varlen_attention = importlib.import_module("fastssl.ops.varlen_attention")  # fastssl.ops exports the function

GPU = torch.device("cuda", 0)


def properties(major, minor, name, shared_kib, warp=32, gcn=""):
    return SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=40, warp_size=warp,
                           shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=shared_kib * 1024,
                           total_memory=16 * 2**30, gcnArchName=gcn)


@pytest.fixture
def a_gpu(monkeypatch):
    """Make torch report one GPU with the given properties (and, for AMD, a ROCm build)."""
    def install(props, hip=None):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.delenv("FASTSSL_TARGET", raising=False)
    return install


def test_every_target_is_consistent():
    assert set(ARCHITECTURES) <= set(TARGETS) and DEFAULT_TARGET in TARGETS
    assert len({TARGETS[name].arch for name in ARCHITECTURES}) == len(ARCHITECTURES)  # one per architecture
    for target in TARGETS.values():
        assert target.vendor in ("cuda", "hip")
        assert target.warp_size == (32 if target.vendor == "cuda" else 64)
        assert 64 * 1024 <= target.shared_memory <= 227 * 1024
        assert target.bf16 == (target.vendor == "hip" or target.capability >= 80)
        assert target.triton_target().arch == (target.capability if target.vendor == "cuda" else target.arch)


def test_a_t4_is_read_from_its_properties(a_gpu):
    a_gpu(properties(7, 5, "Tesla T4", 64))
    facts = target_of(GPU)
    assert (facts.arch, facts.vendor, facts.shared_memory, facts.warp_size, facts.bf16) == \
        ("sm_75", "cuda", 64 * 1024, 32, False)
    assert "T4" in facts.products


def test_an_mi300x_under_rocm_is_read_from_its_properties(a_gpu):
    a_gpu(properties(9, 4, "AMD Instinct MI300X", 64, warp=64, gcn="gfx942:sramecc+:xnack-"), hip="6.2")
    facts = target_of(GPU)
    assert (facts.arch, facts.vendor, facts.warp_size, facts.bf16) == ("gfx942", "hip", 64, True)
    reason = fastssl.available_backends(GPU)["cuda"]
    assert "ROCm" in reason and "triton" in reason


def test_fastssl_target_sizes_launches_off_the_gpu(monkeypatch):
    monkeypatch.setenv("FASTSSL_TARGET", "mi250x")
    assert requested_target().arch == "gfx90a"
    assert target_of(torch.device("cpu")).warp_size == 64
    monkeypatch.setenv("FASTSSL_TARGET", "h300")
    with pytest.raises(ValueError, match="FASTSSL_TARGET='h300' is not a known target; known: v100, t4"):
        target_of(torch.device("cpu"))
    monkeypatch.delenv("FASTSSL_TARGET")
    assert target_of(torch.device("cpu")).name == DEFAULT_TARGET


def test_fastssl_target_is_refused_for_tensors_on_a_gpu(a_gpu, monkeypatch):
    a_gpu(properties(8, 0, "A100", 163))
    monkeypatch.setenv("FASTSSL_TARGET", "t4")
    with pytest.raises(ValueError, match="FASTSSL_TARGET=t4 is set, but the tensors are on a GPU"):
        target_of(GPU)


@pytest.mark.parametrize("major,minor,dtype,scaled", [(7, 5, torch.float16, True), (7, 0, torch.float16, True),
                                                      (8, 0, torch.bfloat16, False), (9, 0, torch.bfloat16, False)])
def test_the_trainer_takes_fp16_with_a_gradient_scaler_where_there_is_no_bf16(a_gpu, major, minor, dtype, scaled):
    a_gpu(properties(major, minor, "a GPU", 99))
    with warnings.catch_warnings():  # without CUDA, torch warns that autocast and the scaler stay off
        warnings.simplefilter("ignore")
        precision = step_precision(TrainConfig(method="dino"), GPU)
        assert step_precision(TrainConfig(method="dino", amp=False), GPU).scaler is None
    assert precision.autocast.fast_dtype == dtype
    assert (precision.scaler is not None) == scaled


@pytest.mark.parametrize("archs,capability,runs", [
    ("75-real,80-real,90-real,120", (7, 5), True), ("75-real,80-real,90-real,120", (8, 6), True),  # sm_80's binary
    ("75-real,80-real,90-real,120", (10, 0), False), ("75-real,80-real,90-real,120", (12, 0), True),
    ("75-real,80-real,90-real,120", (12, 1), True),
    ("80-real,90", (10, 0), True),  # sm_90's PTX, compiled by the driver
    ("80-real,90", (7, 0), False), ("80-real,90", (7, 5), False), ("80", (8, 9), True), ("", (9, 0), False)])
def test_the_cuda_kernels_run_where_a_binary_or_older_ptx_was_built(archs, capability, runs):
    assert _native.runs_on(archs, capability) == runs


def test_a_gpu_the_build_does_not_cover_says_how_to_build_for_it(monkeypatch):
    module = SimpleNamespace(has_cuda=True, cuda_archs="80-real,90", cuda_status="built with CUDA 13.0 for sm_80,sm_90")
    monkeypatch.setattr(_native, "_MODULE", module)
    monkeypatch.setattr(_native, "_capability", lambda index: (7, 5))
    reason = fastssl.available_backends(GPU)["cuda"]
    assert "does not run on this sm_75 GPU" in reason and "FASTSSL_CUDA_ARCHS=75" in reason
    monkeypatch.setattr(_native, "_capability", lambda index: (8, 9))
    assert fastssl.available_backends(GPU)["cuda"] is None


@pytest.mark.parametrize("gpu", ["t4", "mi300x"])
def test_attention_on_a_64_kib_gpu_launches_tiles_that_fit_it(gpu):
    """A GPU that reports a T4's or an MI300X's properties (fp16, DINO's crops): every launch
    of the attention backward is sized from those facts, the candidates judged by what their
    binaries for that GPU need, and each launched binary fits its 64 KiB (compiled, so in a
    process without the interpreter: tests/compile_kernels.py's ``launches_on_a_gpu``)."""
    code = f"import compile_kernels, json; print(json.dumps(compile_kernels.attention_launches_on_a_gpu({gpu!r})))"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSSL_TARGET")}
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-5000:]
    facts, launches = json.loads(result.stdout.splitlines()[-1])
    assert (facts["shared_memory"], facts["warp_size"], facts["bf16"]) == \
        ((64 * 1024, 32, False) if gpu == "t4" else (64 * 1024, 64, True))
    dkdv = [launch for launch in launches if launch["kernel"] == "_dkdv_kernel"]
    assert len(dkdv) == 3 and all(launch["shared"] <= 64 * 1024 for launch in launches)
    if gpu == "t4":  # the long class's first choice, 128 x 32 tiles, needs 128 KiB on sm_75 (FMA dots)
        first = varlen_attention.length_classes(64, 2)[-1].backward[0]
        assert dkdv[-1]["BLOCK_N"] * dkdv[-1]["BLOCK_M"] < first.rows * first.cols
