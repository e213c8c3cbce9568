import math

import pytest
import torch
from accuracy import assert_accurate, assert_close
from conftest import kernel_backends

import fastssl
from fastssl.ops import sinkhorn_knopp
from fastssl.reference import sinkhorn_knopp_log_domain, sinkhorn_knopp_original

LOW_PRECISION = (torch.bfloat16, torch.float16)


def run(backend: str, *args, **kwargs) -> torch.Tensor:
    with fastssl.use_backend(backend):
        return sinkhorn_knopp(*args, **kwargs)


def exponent_rounding(scores: torch.Tensor, eps: float) -> float:
    """atol for float32 Sinkhorn outputs (values up to 1): the exponent arguments
    |scores / eps| are rounded to float32 (relative 2**-24) in the kernel and in the baseline
    alike, each rounding moving Q by that much relative."""
    return 4 * 2**-24 * max(scores.abs().max().item() / eps, 1.0)


def make_scores(shape, dtype, device, scale=1.0):
    # Normalized-embedding-times-prototype scores lie in [-1, 1] in SwAV and DINOv2.
    return (torch.rand(shape, device=device) * 2 - 1).mul(scale).to(dtype)


# Small versions of the required shapes, odd sizes, and K beyond one row tile (20000).
SHAPES = [
    ((1, 1), 0.05, 3),
    ((1, 7), 0.05, 3),
    ((7, 1), 0.05, 3),
    ((37, 49), 0.05, 3),
    ((50, 197), 0.05, 3),
    ((257, 3), 0.05, 3),
    ((160, 300), 0.05, 3),  # SwAV (4096 / 256+3840, 3000), shrunk
    ((8, 5000), 0.04, 3),  # DINOv2 (128, 65536), shrunk
    ((100, 3000), 0.07, 3),  # iBOT (~1000, 131072), shrunk
    ((600, 200), 0.05, 10),  # Time-Tuning (25088, 200) x 10 iterations, shrunk
    ((6, 196, 3), 0.05, 30),  # DoRA (64, 196, 3) x 30 iterations, shrunk
    ((2, 3, 37, 50), 0.05, 3),  # two leading batch dimensions
    ((5, 20000), 0.05, 2),  # row longer than one tile: the separate write pass
]


@pytest.mark.parametrize("shape,eps,n_iters", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_log_domain_reference_equals_original(shape, eps, n_iters):
    scores = make_scores(shape, torch.float64, "cpu")
    q, lse_b = sinkhorn_knopp_log_domain(scores, eps, n_iters)
    assert_close(q, sinkhorn_knopp_original(scores, eps, n_iters), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(lse_b).all()


@pytest.mark.parametrize("kernel_backend", kernel_backends(native=True), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,eps,n_iters", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_kernels_match_original(kernel_backend, dtype, shape, eps, n_iters, poisoned_outputs):
    backend, kernel_device = kernel_backend
    scores = make_scores(shape, dtype, kernel_device)
    q = run(backend, scores, eps, n_iters)
    assert q.dtype == torch.float32 and q.shape == scores.shape
    exact = sinkhorn_knopp_original(scores.double(), eps, n_iters)
    # The kernels compute in float32 whatever the input dtype (as DINOv2 does with .float()).
    baseline = sinkhorn_knopp_original(scores.float(), eps, n_iters)
    assert_accurate(q, baseline, exact, atol=exponent_rounding(scores, eps), what=f"{shape} {dtype}")
    assert_close(q.sum(-1), torch.ones(shape[:-1], device=kernel_device))


@pytest.mark.parametrize("kernel_backend", kernel_backends(native=True), indirect=True)
def test_non_contiguous_inputs(kernel_backend, poisoned_outputs):
    backend, kernel_device = kernel_backend
    base = make_scores((300, 97), torch.float32, kernel_device)
    views = {
        "transposed": base.t(),  # (97, 300), prototypes contiguous
        "strided": base[::3, ::2],  # (100, 49), both strides > 1
        "batched-transposed": base.reshape(3, 100, 97).transpose(0, 1),  # (100, 3, 97)
    }
    for name, view in views.items():
        assert not view.is_contiguous()
        q = run(backend, view, 0.05, 3)
        exact = sinkhorn_knopp_original(view.double(), 0.05, 3)
        baseline = sinkhorn_knopp_original(view.float(), 0.05, 3)
        assert_accurate(q, baseline, exact, atol=exponent_rounding(view, 0.05), what=name)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("value,eps", [(1.0, 0.005), (50.0, 0.05), (1e4, 1e-3)])
def test_extreme_logits_do_not_overflow(backend, value, eps):
    # scores / eps reaches 200 .. 1e7: the original overflows even in float64 (exp > 709).
    scores = make_scores((37, 50), torch.float32, "cpu", scale=value)
    assert not torch.isfinite(sinkhorn_knopp_original(scores.clone(), eps, 3)).all()
    q = run(backend, scores, eps, 3)
    exact, _ = sinkhorn_knopp_log_domain(scores.double(), eps, 3)
    baseline, _ = sinkhorn_knopp_log_domain(scores, eps, 3)
    assert_accurate(q, baseline, exact, atol=exponent_rounding(scores, eps), what=f"{value}/{eps}")
    # Rows sum to 1 up to the rounding of their log-sum-exp's exponent (scaling the whole row)
    # and of the 50 terms of the sum.
    assert_close(q.sum(-1), torch.ones(37), rtol=0, atol=exponent_rounding(scores, eps) + 50 * 2**-24,
                 what="row sums")


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_equal_to_original_close_to_its_overflow(backend):
    # Largest values at which the float32 original is still finite: exp(80) ~ 5.5e34.
    scores = make_scores((64, 100), torch.float32, "cpu", scale=4.0)
    original = sinkhorn_knopp_original(scores.clone(), 0.05, 3)
    assert torch.isfinite(original).all()
    exact = sinkhorn_knopp_original(scores.double(), 0.05, 3)
    assert_accurate(run(backend, scores, 0.05, 3), original, exact, atol=exponent_rounding(scores, 0.05))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_negative_infinity_scores_get_zero_mass(backend):
    # exp(-inf) = 0 in the original: such entries are a legitimate mask.
    scores = make_scores((20, 30), torch.float32, "cpu")
    scores[3, :10] = -math.inf
    q = run(backend, scores, 0.1, 3)
    exact = sinkhorn_knopp_original(scores.double(), 0.1, 3)
    baseline = sinkhorn_knopp_original(scores.clone(), 0.1, 3)
    assert_accurate(q, baseline, exact, atol=exponent_rounding(scores[3:, 10:], 0.1))
    assert (q[3, :10] == 0).all()


def test_assignment_properties():
    # eps = 0.5 keeps exp(scores / eps) within [e^-2, e^2]: Sinkhorn converges fast, so 50
    # iterations reach equipartition, each prototype receiving B / K of the mass.
    scores = make_scores((64, 16), torch.float32, "cpu")
    q = run("triton", scores, 0.5, 50)
    assert (q >= 0).all()
    assert_close(q.sum(1), torch.ones(64))
    assert_close(q.sum(0), torch.full((16,), 64 / 16), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_input_requiring_grad_gives_a_constant_target(backend):
    scores = make_scores((8, 12), torch.float32, "cpu").requires_grad_()
    q = run(backend, scores, 0.05, 3)
    assert not q.requires_grad
    # Usable inside autograd code, as a target for a loss on the same scores.
    loss = -(q * torch.log_softmax(scores / 0.1, dim=1)).sum(1).mean()
    loss.backward()
    assert torch.isfinite(scores.grad).all()


BAD_INPUTS = [
    (lambda: [1.0, 2.0], {}, TypeError, "scores must be a torch.Tensor"),
    (lambda: torch.ones(5, dtype=torch.int64).reshape(1, 5), {}, TypeError, "scores must be float"),
    (lambda: torch.ones(5), {}, ValueError, "scores must have at least 2 dimensions"),
    (lambda: torch.ones(0, 5), {}, ValueError, "scores must not be empty"),
    (lambda: torch.ones(4, 5), {"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
    (lambda: torch.ones(4, 5), {"eps": -1.0}, ValueError, "eps must be a finite number > 0"),
    (lambda: torch.ones(4, 5), {"eps": math.nan}, ValueError, "eps must be a finite number > 0"),
    (lambda: torch.ones(4, 5), {"n_iters": 0}, ValueError, "n_iters must be >= 1"),
    (lambda: torch.ones(4, 5), {"n_iters": 2.0}, TypeError, "n_iters must be an int"),
    (lambda: torch.ones(4, 5), {"n_iters": True}, TypeError, "n_iters must be an int"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("make,kwargs,error,message", BAD_INPUTS, ids=[b[3] + str(b[1]) for b in BAD_INPUTS])
def test_bad_arguments(backend, make, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(backend, make(), **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("shape", [(6, 9), (40, 20000)])
def test_non_finite_scores_raise(backend, bad_value, shape):
    scores = make_scores(shape, torch.float32, "cpu")
    scores[2, 5] = bad_value
    with pytest.raises(ValueError, match="scores contains NaN or Inf"):
        run(backend, scores, 0.05, 3)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_prototype_with_all_scores_minus_infinity_raises(backend):
    scores = make_scores((6, 9), torch.float32, "cpu")
    scores[:, 4] = -math.inf  # the original divides 0 by 0 here
    with pytest.raises(ValueError, match="all\n?.*-inf"):
        run(backend, scores, 0.05, 3)


def test_requested_backend_that_cannot_run_explains_every_backend():
    scores = make_scores((4, 5), torch.float64, "cpu")
    with pytest.raises(fastssl.BackendUnavailableError) as info:
        run("triton", scores)
    message = str(info.value)
    assert "'triton' was requested" in message
    assert "float64 input runs on the reference backend" in message
    assert "cuda: needs a CUDA device, got cpu" in message
    assert "reference: available" in message


def test_default_backend_on_cpu_is_cpp_then_reference(monkeypatch):
    monkeypatch.delenv("FASTSSL_BACKEND", raising=False)
    scores = make_scores((4, 5), torch.float32, "cpu")
    calls = []
    monkeypatch.setattr("fastssl.ops.sinkhorn._sinkhorn_native", lambda *args: calls.append(args) or
                        (torch.zeros(1, 4, 5), torch.zeros(1, 4)))
    sinkhorn_knopp(scores)
    assert len(calls) == 1
    q = sinkhorn_knopp(scores.double())  # float64 stays float64 only on the reference backend
    assert q.dtype == torch.float64


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_custom_op_registration(backend):
    scores = make_scores((37, 50), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastssl.sinkhorn_knopp.default, (scores, 0.05, 3, "", backend))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_torch_compile_traces_without_graph_breaks(backend):
    scores = make_scores((2, 37, 50), torch.float32, "cpu")

    def targets(s):
        return sinkhorn_knopp(s * 2.0, eps=0.05, n_iters=3)

    with fastssl.use_backend(backend):
        compiled = torch.compile(targets, fullgraph=True, backend="aot_eager")
        assert_close(compiled(scores), targets(scores))


# ---------------------------------------------------------------- real sizes on a GPU

GPU_SHAPES = [
    ((4096, 3000), 0.05, 3),
    ((256 + 3840, 3000), 0.05, 3),
    ((128, 65536), 0.04, 3),
    ((24, 131072), 0.07, 3),
    ((1000, 131072), 0.07, 3),
    ((25088, 200), 0.05, 10),
    ((64, 196, 3), 0.05, 30),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,eps,n_iters", GPU_SHAPES, ids=[str(s[0]) for s in GPU_SHAPES])
def test_real_sizes_on_gpu(backend, dtype, shape, eps, n_iters, poisoned_outputs):
    scores = make_scores(shape, dtype, "cuda")
    q = run(backend, scores, eps, n_iters)
    exact = sinkhorn_knopp_original(scores.double(), eps, n_iters)
    baseline = sinkhorn_knopp_original(scores.float(), eps, n_iters)
    assert_accurate(q, baseline, exact, atol=exponent_rounding(scores, eps), what=f"{shape} {dtype}")
