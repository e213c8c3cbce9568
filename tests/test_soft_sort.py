import functools
import importlib

import pytest
import torch
from accuracy import assert_accurate, assert_close, output_rounding, simulated_float32_row_runs, worst
from conftest import kernel_devices

import fastssl
from fastssl.nn import DiffSortNet
from fastssl.ops import soft_sort
from fastssl.reference.diffsort import DISTRIBUTIONS, NETWORKS, comparator_count, network_codes, soft_sort_reference

soft_sort_module = importlib.import_module("fastssl.ops.soft_sort")  # fastssl.ops exports the function
diffsort = pytest.importorskip("diffsort")

SIZES = [2, 3, 7, 16, 49, 64, 100]
STEEPNESS = [1.0, 10.0, 100.0]


def sort_and_grad(fn, x, grad_sorted, grad_P):
    x = x.detach().clone().requires_grad_()
    x_sorted, P = fn(x)
    ((x_sorted.double() * grad_sorted).sum() + (P.double() * grad_P).sum()).backward()
    return x_sorted.detach(), P.detach(), x.grad


def diffsort_fn(network, n, steepness, distribution, device="cpu"):
    module = diffsort.DiffSortNet(network, n, steepness=steepness, distribution=distribution)
    module.sorting_network = [[m.to(device) for m in layer] for layer in module.sorting_network]
    return module


def reference_steps(network, n, steepness, distribution, device="cpu", gradients=False):
    """(ours, diffsort's): float32-capable plain-PyTorch runs of the function under test,
    ``f(x) -> (x_sorted, P)`` or, with ``gradients``, ``f(x, grad_sorted, grad_P) ->
    (x_sorted, P, dL/dx)``."""
    ours = functools.partial(soft_sort_reference, steepness=steepness, network=network, distribution=distribution)
    theirs = diffsort_fn(network, n, steepness, distribution, device)
    if not gradients:
        return ours, theirs
    return functools.partial(sort_and_grad, ours), functools.partial(sort_and_grad, theirs)


def assert_outputs_accurate(outputs, x, ours, theirs, names, row_args=()):
    """The accuracy rule per output: exact is diffsort's float64 run; the baseline is the worst
    of three kinds of float32 run: ours, diffsort's (dense split matrices, another rounding
    order) and simulated roundings of ours. A near-tie amplifies each rounding by up to
    steepness / pi, so the error of one float32 run is a noisy draw: the simulated runs'
    errors reach 9x a real run's (sixteen of them, see accuracy.simulated_float32_row_runs).
    ``row_args``: the output gradients, per row like x.

    Half-precision outputs: the kernels compute in float32 and round each output once, so the
    baselines are float32 runs rounded to the output's dtype."""
    exact = theirs(x.double(), *row_args)
    baselines = [ours(x.float(), *row_args), theirs(x.float(), *row_args),
                 *simulated_float32_row_runs(ours, x.double(), *row_args)]
    for index, (value, what) in enumerate(zip(outputs, names)):
        base = worst([baseline[index].to(value.dtype) for baseline in baselines], exact[index])
        assert_accurate(value, base, exact[index], atol=output_rounding(exact[index], value.dtype), what=what)


def random_rows(rows, n, device="cpu"):
    # Gaussian values: near-ties (alpha near 1/2) and clear orders both occur.
    return (torch.randn(rows, n, device=device) * 2).float()


def separated_rows(rows, n):
    """Shuffled values at least 1/2 apart: no near-ties, so float32 rounding is not amplified
    (for tests whose subject is not accuracy at ties)."""
    return torch.stack([torch.randperm(n) + torch.rand(n) / 2 for _ in range(rows)]).float()


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_reference_equals_diffsort_in_float64(network, distribution):
    # Every steepness for the small sizes, one (cycling) for the large ones: CPU time.
    cases = [(n, s) for n in SIZES[:4] for s in STEEPNESS] + [(n, STEEPNESS[i]) for i, n in enumerate(SIZES[4:])]
    for n, steepness in cases:
        x = torch.randn(2, n, dtype=torch.float64) * 2
        expected_sorted, expected_P = diffsort.DiffSortNet(network, n, steepness=steepness,
                                                           distribution=distribution)(x)
        x_sorted, P = soft_sort_reference(x, steepness, network, distribution)
        # Both are float64 evaluations of the same formula; they differ by the order of a few
        # roundings per layer (diffsort multiplies by 0/1 split matrices).
        assert_close(P, expected_P, rtol=0, atol=1e-12)
        assert_close(x_sorted, expected_sorted, rtol=0, atol=1e-12 * x.abs().max().item())


def test_network_tables():
    assert network_codes("bitonic", 49).shape == (21, 64)
    assert network_codes("odd_even", 49).shape == (49, 64)
    # diffsort's 546 comparators at n=49 include the 63 that meet a discarded wire (pass-through).
    assert comparator_count("bitonic", 49) == 546 - 63
    assert comparator_count("odd_even", 7) == 7 * 3


def test_reference_gradcheck_float64():
    x = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    for distribution in DISTRIBUTIONS:
        torch.autograd.gradcheck(lambda v: soft_sort_reference(v, 3.0, "bitonic", distribution), (x,))


# One steepness per (distribution, size), cycling, so that every value meets every size and
# distribution across the grid while each case runs the interpreter once.
FORWARD_CASES = [(net, dist, n, STEEPNESS[(i + j) % 3]) for net in NETWORKS
                 for i, dist in enumerate(DISTRIBUTIONS) for j, n in enumerate(SIZES)]


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("network,distribution,n,steepness", FORWARD_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]:g}" for c in FORWARD_CASES])
def test_kernel_forward_matches_reference(kernel_device, network, distribution, n, steepness, poisoned_outputs):
    x = random_rows(4, n, kernel_device)
    with fastssl.use_backend("triton"):
        outputs = soft_sort(x, steepness, network, distribution)
    assert_outputs_accurate(outputs, x, *reference_steps(network, n, steepness, distribution, device=kernel_device),
                            ("x_sorted", "P"))


GRADIENT_CASES = ([(net, dist, 7, 10.0) for net in NETWORKS for dist in DISTRIBUTIONS]
                  + [("bitonic", "cauchy", n, 100.0) for n in (2, 3, 49, 100)]
                  + [("odd_even", "cauchy", 16, 100.0), ("odd_even", "logistic_phi", 49, 1.0)])


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("network,distribution,n,steepness", GRADIENT_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]:g}" for c in GRADIENT_CASES])
def test_kernel_gradient_matches_reference(kernel_device, network, distribution, n, steepness, poisoned_outputs):
    rows = 2 if n <= 16 else 1
    x = random_rows(rows, n, kernel_device)
    grad_sorted = torch.randn(rows, n, dtype=torch.float64, device=kernel_device)
    grad_P = torch.randn(rows, n, n, dtype=torch.float64, device=kernel_device)
    with fastssl.use_backend("triton"):
        outputs = sort_and_grad(lambda v: soft_sort(v, steepness, network, distribution), x, grad_sorted, grad_P)
    assert outputs[2].dtype == torch.float32
    ours, theirs = reference_steps(network, n, steepness, distribution, kernel_device, gradients=True)
    assert_outputs_accurate(outputs, x, ours, theirs, ("x_sorted", "P", "gradient"), (grad_sorted, grad_P))


@pytest.mark.parametrize("network,n", [("bitonic", 49), ("odd_even", 16)])
def test_gpu_tiling_and_checkpoint_recomputation(monkeypatch, network, n):
    """The GPU's launch configuration: several P tiles per row (partial dL/dalpha summed over
    tiles) and checkpoints every ~sqrt(L) layers (recomputation in the backward)."""
    N = soft_sort_module.padded_size(n)
    monkeypatch.setattr(soft_sort_module, "INTERPRETER_TILE_ELEMENTS", N * N // 4)
    monkeypatch.setattr(soft_sort_module, "INTERPRETER_CHECKPOINT_EVERY", 0)
    _, tile, _ = soft_sort_module.launch_shape(n, torch.device("cpu"))
    assert N // tile == 4 and soft_sort_module.checkpoint_interval(network_codes(network, n).shape[0],
                                                                    torch.device("cpu")) > 1
    x = separated_rows(2, n)
    grad_sorted, grad_P = torch.randn(2, n, dtype=torch.float64), torch.randn(2, n, n, dtype=torch.float64)
    with fastssl.use_backend("triton"):
        outputs = sort_and_grad(lambda v: soft_sort(v, 30.0, network), x, grad_sorted, grad_P)
    assert_outputs_accurate(outputs, x, *reference_steps(network, n, 30.0, "cauchy", gradients=True),
                            ("x_sorted", "P", "gradient"), (grad_sorted, grad_P))


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(kernel_device, dtype):
    n = 49
    x = random_rows(1, n, kernel_device).to(dtype)
    # Output gradients of half outputs reach the kernel in that dtype: the references get the
    # same values (float64 ones would hand the kernel an input rounding no reference has, which
    # a near-tie at steepness 100 amplifies past the bound).
    grad_sorted = torch.randn(1, n, dtype=torch.float64, device=kernel_device).to(dtype).double()
    grad_P = torch.randn(1, n, n, dtype=torch.float64, device=kernel_device).to(dtype).double()
    with fastssl.use_backend("triton"):
        outputs = sort_and_grad(lambda v: soft_sort(v, 100.0), x, grad_sorted, grad_P)
    assert all(output.dtype == dtype for output in outputs)
    assert_outputs_accurate(outputs, x, *reference_steps("bitonic", n, 100.0, "cauchy", kernel_device, gradients=True),
                            ("x_sorted", "P", "gradient"), (grad_sorted, grad_P))


def test_non_contiguous_rows_and_leading_dimensions():
    wide = random_rows(2 * 3, 40)
    x = wide[:, ::2].reshape(2, 3, 20)  # strided columns, two leading dimensions
    with fastssl.use_backend("triton"):
        x_sorted, P = soft_sort(x, 10.0, "odd_even", "logistic")
    expected_sorted, expected_P = soft_sort_reference(x.double(), 10.0, "odd_even", "logistic")
    assert x_sorted.shape == (2, 3, 20) and P.shape == (2, 3, 20, 20)
    assert_close(P.double(), expected_P, rtol=0, atol=1e-5)
    assert_close(x_sorted.double(), expected_sorted, rtol=0, atol=1e-5)


def test_sorted_output_is_x_times_P_and_P_doubly_stochastic():
    x = random_rows(2, 49)
    with fastssl.use_backend("triton"):
        x_sorted, P = soft_sort(x, 100.0)
    assert_close(x_sorted, (x[:, None, :] @ P)[:, 0], rtol=0, atol=1e-5)
    assert_close(P.sum(-1), torch.ones(2, 49), rtol=0, atol=1e-5)
    assert_close(P.sum(-2), torch.ones(2, 49), rtol=0, atol=1e-5)
    assert (x_sorted[:, 1:] >= x_sorted[:, :-1] - 1e-3).all()


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_diffsortnet_is_a_drop_in(backend):
    x = random_rows(3, 49)
    ours = DiffSortNet("bitonic", 49, steepness=100.0)
    with fastssl.use_backend(backend):
        outputs = ours(x)
    assert_outputs_accurate(outputs, x, *reference_steps("bitonic", 49, 100.0, "cauchy"), ("x_sorted", "P"))


def test_float64_runs_on_the_reference_and_triton_says_why():
    x = torch.randn(2, 5, dtype=torch.float64)
    assert soft_sort(x)[1].dtype == torch.float64
    with fastssl.use_backend("triton"), pytest.raises(fastssl.BackendUnavailableError, match="float64"):
        soft_sort(x)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(x=torch.randn(4, 1)), ValueError, r"n >= 2"),
        (dict(x=torch.randn(4, 5), network="merge"), ValueError, "network must be one of bitonic, odd_even"),
        (dict(x=torch.randn(4, 5), distribution="laplace"), ValueError, "distribution must be one of"),
        (dict(x=torch.tensor([[0.0, float("nan"), 1.0]])), ValueError, "x contains NaN or Inf"),
        (dict(x=torch.tensor([[0.0, float("inf"), 1.0]])), ValueError, "x contains NaN or Inf"),
        (dict(x=torch.arange(6).reshape(2, 3)), TypeError, "x must be float"),
        (dict(x=torch.zeros(0, 5)), ValueError, "x must not be empty"),
        (dict(x=torch.randn(4, 5), steepness=float("nan")), ValueError, "steepness must be a finite number"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_bad_input(kwargs, error, message, backend):
    with fastssl.use_backend(backend), pytest.raises(error, match=message):
        soft_sort(**kwargs)
    with pytest.raises(ValueError, match="network must be one of"):
        DiffSortNet("merge", 5)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_custom_op_registration(backend):
    x = random_rows(2, 7).requires_grad_()
    torch.library.opcheck(torch.ops.fastssl.soft_sort_fwd.default, (x, 10.0, "bitonic", "cauchy", 0.25, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_forward_and_backward():
    x = random_rows(2, 7).requires_grad_()

    def step(v):
        x_sorted, P = soft_sort(v * 1.0, 10.0)
        return (x_sorted * torch.arange(7.0)).sum() + (P * P).sum()

    with fastssl.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled(x).backward()
        grad = x.grad.clone()
        x.grad = None
        step(x).backward()
    assert_close(grad, x.grad)
