"""The soft-sort and NeCo kernels of fastssl._C (C++ on the CPU, CUDA marked gpu) against the
float64 references, with the accuracy rule of tests/accuracy.py: the kernel's error at most
2x the float32 reference's own error plus the float32 rounding of the output's magnitude."""

import functools

import pytest
import torch
from accuracy import assert_accurate, assert_close, output_rounding, simulated_float32_row_runs, worst

from fastssl import _native
from fastssl.ops import _soft_sort_native as native
from fastssl.reference.diffsort import DISTRIBUTIONS, NETWORKS, soft_sort_reference
from fastssl.reference.neco import neco_loss_rows_reference

SIZES = [2, 3, 7, 16, 49, 64]
STEEPNESS = [1.0, 10.0, 100.0]
ART_LAMBDA = 0.25
# Long networks amplify each 1-ulp rounding of alpha by tens of units in the outputs, for the
# reference as much as for the kernels; the largest error over several rows is a stable
# measure of that, the error of one or two rows is not.
ROWS = 8


@pytest.fixture(params=[pytest.param("cpu", id="cpp"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request):
    reason = _native.cpp_reason() if request.param == "cpu" else _native.cuda_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    return request.param


def random_rows(rows, n, device, dtype=torch.float32):
    return (torch.randn(rows, n, device=device) * 2).to(dtype)


def reference_and_grads(x, grad_sorted, grad_P, *, compute_dtype, steepness, network, distribution):
    """(x_sorted, P, dL/dx) of the reference in ``compute_dtype`` by autograd."""
    leaf = x.detach().to(compute_dtype).requires_grad_()
    x_sorted, P = soft_sort_reference(leaf, steepness, network, distribution, ART_LAMBDA)
    loss = 0
    if grad_sorted is not None:
        loss = loss + (x_sorted * grad_sorted.to(compute_dtype)).sum()
    if grad_P is not None:
        loss = loss + (P * grad_P.to(compute_dtype)).sum()
    loss.backward()
    return x_sorted.detach(), P.detach(), leaf.grad


def assert_outputs_accurate(outputs, reference, x, names, row_args):
    """The accuracy rule per output against ``reference(x, *row_args, compute_dtype=dtype)`` (a
    tuple of outputs, each row computed on its own): exact in float64; the baseline is the
    worst of the float32 run and simulated float32 roundings (steep networks amplify single
    roundings, so one run's error is a noisy draw; see tests/test_soft_sort.py::
    assert_outputs_accurate)."""
    exact = reference(x, *row_args, compute_dtype=torch.float64)
    baselines = [reference(x, *row_args, compute_dtype=torch.float32),
                 *simulated_float32_row_runs(functools.partial(reference, compute_dtype=torch.float64), x.double(),
                                             *row_args)]
    for index, (actual, name) in enumerate(zip(outputs, names)):
        assert actual.dtype == torch.float32
        base = worst([baseline[index] for baseline in baselines], exact[index])
        assert_accurate(actual.cpu(), base.cpu(), exact[index].cpu(), atol=output_rounding(exact[index], torch.float32),
                        what=name)


def check_sort(x, steepness, network, distribution, grad_sorted, grad_P, what):
    x_sorted, P = native.soft_sort_forward_native(x, steepness, network, distribution, ART_LAMBDA)
    grad_x = native.soft_sort_backward_native(x, grad_sorted, grad_P, steepness, network, distribution, ART_LAMBDA)
    assert_outputs_accurate((x_sorted, P, grad_x), functools.partial(
        reference_and_grads, steepness=steepness, network=network, distribution=distribution), x,
        [f"{what} {name}" for name in ("x_sorted", "P", "grad_x")], (grad_sorted, grad_P))


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_soft_sort_matches_float64_reference(device, network, distribution, poisoned_outputs):
    # Every steepness for the small sizes, one (cycling) for the large ones: CPU time.
    # n = 64 only on bitonic: odd-even's 64 layers cost the references most, and n = 49 runs
    # odd-even on the same 64 wires.
    cases = [(n, s) for n in SIZES[:3] for s in STEEPNESS] + [(n, STEEPNESS[i % 3]) for i, n in enumerate(SIZES[3:])]
    for n, steepness in cases:
        if network == "odd_even" and n == 64:
            continue
        x = random_rows(ROWS, n, device)
        grad_sorted = torch.randn(ROWS, n, device=device)
        grad_P = torch.randn(ROWS, n, n, device=device)
        check_sort(x, steepness, network, distribution, grad_sorted, grad_P, f"n={n} steepness={steepness}")


@pytest.mark.parametrize("network, distribution, steepness", [
    ("bitonic", "cauchy", 1.0), ("bitonic", "logistic_phi", 10.0), ("odd_even", "reciprocal", 100.0)])
def test_soft_sort_n100(device, network, distribution, steepness):
    # n = 100 (N = 128): the references are slow here (odd-even: 100 layers), so fewer cases.
    x = random_rows(ROWS, 100, device)
    check_sort(x, steepness, network, distribution, torch.randn(ROWS, 100, device=device),
               torch.randn(ROWS, 100, 100, device=device), f"n=100 steepness={steepness}")


@pytest.mark.parametrize("which", ["x_sorted only", "P only", "neither"])
def test_absent_output_gradients(device, which):
    n = 49
    x = random_rows(4, n, device)
    grad_sorted = torch.randn(4, n, device=device) if which == "x_sorted only" else None
    grad_P = torch.randn(4, n, n, device=device) if which == "P only" else None
    if which == "neither":
        grad_x = native.soft_sort_backward_native(x, None, None, 10.0, "bitonic", "cauchy", ART_LAMBDA)
        assert torch.equal(grad_x, torch.zeros_like(grad_x))
        return
    check_sort(x, 10.0, "bitonic", "cauchy", grad_sorted, grad_P, which)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("network", NETWORKS)
def test_half_precision_inputs(device, dtype, network):
    # The kernels read half rows and compute in float32, like the reference.
    for n, steepness in [(7, 10.0), (49, 100.0)]:
        x = random_rows(ROWS, n, device, dtype)
        grad_sorted = torch.randn(ROWS, n, device=device).to(dtype)
        grad_P = torch.randn(ROWS, n, n, device=device).to(dtype)
        check_sort(x, steepness, network, "cauchy", grad_sorted, grad_P, f"{dtype} n={n}")


def test_non_contiguous_inputs(device):
    n = 37
    x = random_rows(2 * n, 5, device).t()[:, ::2]  # (5, 37), strides (1, 10)
    assert not x.is_contiguous()
    grad_sorted = torch.randn(n, 5, device=device).t()
    grad_P = torch.randn(5, n, n, device=device).transpose(1, 2)
    check_sort(x, 10.0, "bitonic", "gaussian", grad_sorted, grad_P, "strided")
    check_sort(x, 10.0, "odd_even", "logistic_phi", grad_sorted, grad_P, "strided")


def check_neco(student, teacher, steepness_student, steepness_teacher, network, distribution, what):
    grad_rows = torch.randn(student.shape[0], device=student.device)

    def reference(rows, teacher_rows, row_weights, compute_dtype):
        leaf = rows.detach().to(compute_dtype).requires_grad_()
        loss = neco_loss_rows_reference(leaf, teacher_rows.to(compute_dtype), steepness_student, steepness_teacher,
                                        network, distribution, ART_LAMBDA)
        (loss * row_weights.to(compute_dtype)).sum().backward()
        return loss.detach(), leaf.grad

    args = (steepness_student, steepness_teacher, network, distribution, ART_LAMBDA)
    loss = native.neco_loss_forward_native(student, teacher, *args)
    grad = native.neco_loss_backward_native(grad_rows, student, teacher, *args)
    assert_outputs_accurate((loss, grad), reference, student, (f"{what} loss", f"{what} grad"), (teacher, grad_rows))


def similarity_rows(rows, n, device):
    """NeCo sorts cosine similarities: values in [-1, 1]."""
    return torch.rand(rows, n, device=device) * 2 - 1


# Per distribution, the steepness for n = 49 that keeps every float64 entry of P_s in float32's
# normal range for rows in [-1, 1] (the smallest over 4000 rows: bitonic cauchy 100: 4e-9,
# odd-even cauchy 30: 5e-28, logistic and optimal 10: 5e-20 and 1e-30). Entries below it lose
# float32 precision, and -P_t / P_s amplifies that without bound: the underflow test's subject.
NECO_STEEPNESS = {("bitonic", "cauchy"): 100.0, ("odd_even", "cauchy"): 30.0}


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", ["cauchy", "logistic", "optimal"])
def test_neco_loss_matches_float64_reference(device, network, distribution, poisoned_outputs):
    steep = NECO_STEEPNESS.get((network, distribution), 10.0)
    for n, steepness in [(2, 10.0), (7, steep), (49, steep)]:
        student = similarity_rows(ROWS, n, device)
        teacher = (student + 0.3 * torch.randn_like(student)).t().contiguous().t()  # column-major copy
        check_neco(student, teacher, steepness, steepness / 2, network, distribution, f"n={n}")


def test_neco_loss_underflow(device):
    # odd-even + cauchy at n = 49, steepness 1000: entries of P_s underflow to exactly 0 in float32.
    n, steepness = 49, 1000.0
    student = random_rows(16, n, device)  # enough rows that some entry underflows whatever the seed
    teacher = student + 0.5 * torch.randn_like(student)
    _, P = native.soft_sort_forward_native(student, steepness, "odd_even", "cauchy", ART_LAMBDA)
    assert (P == 0).any(), "the case is meant to underflow"
    loss = native.neco_loss_forward_native(student, teacher, steepness, steepness, "odd_even", "cauchy", ART_LAMBDA)
    assert torch.isfinite(loss).all()
    # The guarded loss of the float32 P (float32's zeros included) is what the kernel computes.
    expected = neco_loss_rows_reference(student, teacher, steepness, steepness, "odd_even", "cauchy", ART_LAMBDA)
    assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    grad = native.neco_loss_backward_native(torch.ones(16, device=device), student, teacher, steepness, steepness,
                                            "odd_even", "cauchy", ART_LAMBDA)
    leaf = student.detach().requires_grad_()
    neco_loss_rows_reference(leaf, teacher, steepness, steepness, "odd_even", "cauchy", ART_LAMBDA).sum().backward()
    finite = torch.isfinite(leaf.grad).all(dim=1)
    assert finite.any(), "no row of the float32 reference has a finite gradient"
    # Rows where float32's -P_t / P_s stays finite: the same float32 computation, reordered.
    assert torch.isfinite(grad[finite]).all()
    scale = leaf.grad[finite].abs().max().item()
    assert_close(grad[finite], leaf.grad[finite], rtol=1e-3, atol=1e-4 * scale)


def test_why_not_and_bad_input():
    x = torch.randn(3, 300)
    if _native.cpp_reason() is None:
        assert native.why_not_native(x, 300) is None
        assert "float64" in native.why_not_native(x.double(), 300)
        with pytest.raises(ValueError, match="rows, n"):
            native.soft_sort_forward_native(x[0], 1.0, "bitonic", "cauchy", ART_LAMBDA)
        with pytest.raises(ValueError, match="n >= 2"):
            native.soft_sort_forward_native(x[:, :1], 1.0, "bitonic", "cauchy", ART_LAMBDA)
        with pytest.raises(ValueError, match="grad_P"):
            native.soft_sort_backward_native(x, None, torch.randn(3, 300, 299), 1.0, "bitonic", "cauchy", ART_LAMBDA)
        with pytest.raises(ValueError, match="distribution"):
            native.soft_sort_forward_native(x, 1.0, "bitonic", "normal", ART_LAMBDA)
        empty_sorted, empty_P = native.soft_sort_forward_native(x[:0], 1.0, "bitonic", "cauchy", ART_LAMBDA)
        assert empty_sorted.shape == (0, 300) and empty_P.shape == (0, 300, 300)
    meta = torch.empty(3, 300, device="meta")
    assert "meta" in native.why_not_native(meta, 300)


@pytest.mark.gpu
def test_cuda_rejects_large_rows():
    reason = _native.cuda_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(2, 300, device="cuda")
    assert "n = 256" in native.why_not_native(x, 300)
    assert native.why_not_native(x[:, :256], 256) is None
