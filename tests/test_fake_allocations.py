"""The custom ops' fakes allocate what their Triton launchers allocate.

A forward and backward through each op's functional API is measured twice with
:class:`fastssl.memory.AllocationTracker`: on real tensors, running the Triton launchers (the
kernels under the interpreter: the launcher code a GPU runs), and on fake tensors
(FakeTensorMode), where each custom op runs its fake. The peaks must be equal, workspaces
that a launcher allocates and frees inside itself included, so that a fake step at a
recipe's sizes predicts the GPU's peak. Sizes are tiny: the interpreter is slow.
"""

import interpreter
import pytest
import torch
from conftest import INTERPRETING
from torch._subclasses.fake_tensor import FakeTensorMode

import fastssl
from fastssl.memory import AllocationTracker
from fastssl.ops import (
    barlow_twins_loss,
    dino_cross_entropy,
    dino_head_cross_entropy,
    info_nce,
    neco_loss,
    sinkhorn_knopp,
    soft_sort,
    varlen_attention,
    vicreg_loss,
)
from fastssl.reference.diffsort import network_codes_tensor

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the real run needs the Triton interpreter")


def _fake(mode: FakeTensorMode, value):
    if not isinstance(value, torch.Tensor):
        return value
    fake = mode.from_tensor(value)
    return fake.requires_grad_(value.requires_grad) if value.is_leaf else fake


def real_and_fake_peaks(step, *inputs, backend: str = "triton") -> tuple[int, int]:
    """Peak bytes of ``step(*inputs)`` on ``backend``: real tensors, then fakes of them."""
    with fastssl.use_backend(backend):
        with interpreter.launches_free_their_arguments(), AllocationTracker() as real:
            step(*inputs)
        with FakeTensorMode() as mode:
            fakes = [_fake(mode, value) for value in inputs]
            with AllocationTracker() as fake:
                step(*fakes)
    return real.peak_bytes, fake.peak_bytes


def assert_same_peak(step, *inputs, backend: str = "triton") -> None:
    real, fake = real_and_fake_peaks(step, *inputs, backend=backend)
    assert real > 0
    assert fake == real, f"fake peak {fake} bytes, real peak {real} bytes"


def leaf(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_varlen_attention(dtype, deterministic):
    lengths = [5, 3]
    q, k, v = (leaf(sum(lengths), 2, 32, dtype=dtype) for _ in range(3))
    cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32)
    grad = torch.randn(sum(lengths), 2, 32, dtype=dtype)

    def step(q, k, v, cu_seqlens, grad):
        # validate=False: the GPU's default (reading cu_seqlens on the host would synchronize)
        varlen_attention(q, k, v, cu_seqlens, deterministic=deterministic, validate=False).backward(grad)

    assert_same_peak(step, q, k, v, cu_seqlens, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("variant", [{}, {"symmetric": True, "exclude_self": True}], ids=["plain", "nt_xent"])
def test_info_nce(dtype, variant):
    def step(query, key):
        info_nce(query, key, 0.5, **variant).backward()

    assert_same_peak(step, leaf(6, 16, dtype=dtype), leaf(6, 16, dtype=dtype))


# The native extension's C++ kernels (the CPU's default) are checked too: their fakes model
# the native launchers, which allocate differently (float32 results, then a cast).
NATIVE_AND_TRITON = ["triton", pytest.param("cpp", marks=pytest.mark.skipif(
    fastssl.available_backends("cpu")["cpp"] is not None, reason="fastssl._C is not built"))]


@pytest.mark.parametrize("backend", NATIVE_AND_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_sort(dtype, backend):
    x = leaf(2, 3, 5, dtype=dtype)
    grads = torch.randn(2, 3, 5, dtype=dtype), torch.randn(2, 3, 5, 5, dtype=dtype)

    def step(x, grad_sorted, grad_P):
        torch.autograd.backward(soft_sort(x), [grad_sorted, grad_P])

    network_codes_tensor("bitonic", 5, "cpu")  # a per-process constant, made before measuring
    assert_same_peak(step, x, *grads, backend=backend)


@pytest.mark.parametrize("backend", NATIVE_AND_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_neco_loss(dtype, backend):
    def step(student, teacher):
        neco_loss(student, teacher).backward()

    network_codes_tensor("bitonic", 5, "cpu")  # a per-process constant, made before measuring
    assert_same_peak(step, leaf(3, 5, dtype=dtype), torch.randn(3, 5, dtype=dtype), backend=backend)


@pytest.mark.parametrize("backend", NATIVE_AND_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 5), (40, 300)], ids=["single_tile", "half_iterations"])
def test_sinkhorn_knopp(dtype, shape, backend):
    assert_same_peak(lambda scores: sinkhorn_knopp(scores), torch.randn(*shape, dtype=dtype), backend=backend)


# The forward alone too: a step's peak is the backward's at these sizes, and the forward's
# partials and merge are the op's own.
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("targets", ["logits", "probabilities"])
def test_dino_cross_entropy(dtype, targets, backward):
    B, K = 2, 40
    student = leaf(3 * B, K, dtype=dtype)
    teacher = torch.randn(2 * B, K, dtype=dtype)
    if targets == "probabilities":
        teacher = teacher.float().softmax(-1).to(dtype)

    def step(student, teacher, center):
        teacher_temp = 0.04 if targets == "logits" else None
        loss, _ = dino_cross_entropy(student, teacher, 3, 2, 0.1, teacher_temp,
                                     center if targets == "logits" else None)
        if backward:
            loss.backward()

    assert_same_peak(step, student, teacher, torch.randn(K))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_dino_head_cross_entropy(backward):
    B, D, K = 2, 8, 40

    def step(student_features, student_weight, teacher_features, teacher_weight):
        loss, _ = dino_head_cross_entropy(student_features, student_weight, teacher_features, teacher_weight, 3, 2,
                                          chunk_size=16)
        if backward:
            loss.backward()

    assert_same_peak(step, leaf(3 * B, D), leaf(K, D), torch.randn(2 * B, D), torch.randn(K, D))


# Not custom ops: their launchers allocate as usual on fake tensors and launch nothing.
@pytest.mark.parametrize("loss", [barlow_twins_loss, vicreg_loss], ids=["barlow_twins", "vicreg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("formulation, shape", [("gram", (6, 16)), ("cross", (20, 8))], ids=["gram", "cross"])
def test_two_view_losses(loss, dtype, formulation, shape):
    def step(z1, z2):
        loss(z1, z2, formulation=formulation).backward()

    assert_same_peak(step, leaf(*shape, dtype=dtype), leaf(*shape, dtype=dtype))


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def test_custom_ops_count_their_fakes_on_meta_tensors():
    """Called on meta tensors (no FakeTensorMode), a custom op's fake is what the tracker runs
    and counts. The functional APIs refuse meta tensors (no backend runs there), so the ops
    are called directly; these ops size their launches alike on the CPU and on meta."""
    q = torch.randn(8, 2, 32)
    cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32)
    student, teacher = torch.randn(6, 40), torch.randn(4, 40)
    calls = [
        (torch.ops.fastssl.varlen_attention_fwd, (q, q, q, cu_seqlens, 0, 0.2, False, False)),
        (torch.ops.fastssl.info_nce_fwd, (q[:, 0], q[:, 1], None, 0.5, 0)),
        (torch.ops.fastssl.sinkhorn_knopp, (torch.randn(40, 300), 0.05, 3, "", "triton")),
        (torch.ops.fastssl.dino_cross_entropy_partials, (student, teacher, torch.randn(40), 3, 2, 0.1, 0.04)),
    ]
    for op, args in calls:
        with interpreter.launches_free_their_arguments(), AllocationTracker() as real:
            op(*args)
        meta_args = [_to_meta(arg) for arg in args]
        with AllocationTracker() as meta:
            op(*meta_args)
        assert meta.peak_bytes == real.peak_bytes > 0, op
