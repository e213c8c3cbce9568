import functools
import os

import pytest
import torch
from accuracy import assert_accurate, assert_close, float32_baseline, output_rounding
from conftest import AllocationRecorder, kernel_devices
from distributed import run_distributed

import fastssl
from fastssl.nn import BarlowTwinsLoss, VICRegLoss
from fastssl.ops import barlow_twins_loss, vicreg_loss
from fastssl.reference.barlow_twins import barlow_twins_loss_original, vicreg_loss_original


def loss_and_grads(fn, z1, z2):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def embeddings(N, D, dtype=torch.float32, device="cpu"):
    z1 = torch.randn(N, D, device=device) * 2 + 1
    z2 = 0.7 * z1 + 0.5 * torch.randn(N, D, device=device)  # correlated views
    return z1.to(dtype), z2.to(dtype)


# N = 2 is left out: standardization maps every column to +-1 and the gradient vanishes.
SHAPES = [(3, 5), (16, 100), (37, 257), (100, 40), (64, 64), (7, 129)]


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("formulation", ["auto", "gram", "cross"])
@pytest.mark.parametrize("N,D", SHAPES, ids=[str(s) for s in SHAPES])
def test_loss_and_gradients_equal_official(kernel_device, dtype, formulation, N, D, poisoned_outputs):
    z1, z2 = embeddings(N, D, dtype, kernel_device)
    with fastssl.use_backend("triton"):
        loss, g1, g2 = loss_and_grads(lambda a, b: barlow_twins_loss(a, b, formulation=formulation), z1, z2)
    # Baseline: the official loss as it runs under autocast: statistics in float32, the
    # cross-correlation matmul in the input dtype. In float32, the worst of that run and
    # simulated roundings of it: the loss squares 1 - C_ii, formed by cancellation where the
    # views correlate, so the error of one run is a noisy draw (1.07 x the bound seen).
    official = functools.partial(loss_and_grads, barlow_twins_loss_original)
    base, exact = float32_baseline(official, z1, z2)
    if dtype != torch.float32:
        base = _autocast_official(z1, z2, dtype)
    assert g1.dtype == dtype
    loss_atol = output_rounding(exact[0], torch.float32) + operand_rounding(z1, z2, dtype)
    assert_accurate(loss, base[0], exact[0], atol=loss_atol, what="loss")
    for got, baseline, expected, cancellation in zip((g1, g2), base[1:], exact[1:],
                                                     standardization_cancellation(z1, z2)):
        atol = output_rounding(expected, dtype) + cancellation
        assert_accurate(got, baseline, expected, atol=atol, what="gradient")


def standardized_gradients(z1, z2):
    """float64 (zn, dL/dzn) for both views, and 1 / std per column."""
    zn = [torch.nn.functional.batch_norm(z.double(), None, None, training=True, eps=1e-5).requires_grad_()
          for z in (z1, z2)]
    c = zn[0].T @ zn[1] / z1.shape[0]
    off = c - torch.diag(torch.diagonal(c))
    (torch.diagonal(c).add(-1).pow(2).sum() + 0.0051 * off.pow(2).sum()).backward()
    rstd = [torch.rsqrt(z.double().var(0, unbiased=False) + 1e-5) for z in (z1, z2)]
    return [(z.detach(), z.grad) for z in zn], rstd


def operand_rounding(z1, z2, dtype) -> float:
    """First-order change of the loss when the standardized operands of the matmul are
    rounded to ``dtype`` (half a unit in the last place each), which any implementation
    running the matmul in ``dtype`` incurs: 2**-9 * sum |dL/dzn| * |zn| for bfloat16."""
    if dtype == torch.float32:
        return 0.0
    pairs, _ = standardized_gradients(z1, z2)
    return torch.finfo(dtype).eps / 2 * sum((g * z).abs().sum().item() for z, g in pairs)


def standardization_cancellation(z1, z2, lambd=0.0051) -> list:
    """The gradient is formed by cancellation twice: dL/dzn is the sum of (2 lambd / N) zn' C
    and zn' d / N, and the standardization's backward subtracts from it its projection on
    (1, zn). For small N the result is much smaller than those terms, and float32 rounding
    is relative to rstd * (|first| + |second|), not to the result: a few units of that."""
    zn = [torch.nn.functional.batch_norm(z.double(), None, None, training=True, eps=1e-5) for z in (z1, z2)]
    N = z1.shape[0]
    c = zn[0].T @ zn[1] / N
    d = -2 * (1 - torch.diagonal(c)) - 2 * lambd * torch.diagonal(c)
    terms = [(2 * lambd / N * zn[1] @ c.T, zn[1] * d / N), (2 * lambd / N * zn[0] @ c, zn[0] * d / N)]
    rstd = [torch.rsqrt(z.double().var(0, unbiased=False) + 1e-5) for z in (z1, z2)]
    return [4 * torch.finfo(torch.float32).eps * r.max().item() * (a.abs().max() + b.abs().max()).item()
            for (a, b), r in zip(terms, rstd)]


def _rounded_product(a, b, dtype):
    return (a.float() @ b.float()).to(dtype).float()


class _AutocastMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, dtype):
        a, b = a.to(dtype), b.to(dtype)
        ctx.save_for_backward(a, b)
        ctx.dtype = dtype
        return _rounded_product(a, b, dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        return _rounded_product(grad, b.T, ctx.dtype), _rounded_product(a.T, grad, ctx.dtype), None


def autocast_matmul(a, b, dtype):
    """a @ b as CUDA autocast computes it, forward and backward: operands rounded to
    ``dtype``, their exact products accumulated in float32, each result rounded to ``dtype``
    (in float32 arithmetic: the CPU's 16-bit matmuls are slow at D = 8192)."""
    return _AutocastMatmul.apply(a, b, dtype)


def _autocast_official(z1, z2, dtype=torch.bfloat16):
    """The official loss with BatchNorm in float32 and the matmul in ``dtype``."""
    def official(a, b):
        a_n = torch.nn.functional.batch_norm(a.float(), None, None, training=True, eps=1e-5)
        b_n = torch.nn.functional.batch_norm(b.float(), None, None, training=True, eps=1e-5)
        c = autocast_matmul(a_n.T, b_n, dtype) / a.shape[0]
        off = c - torch.diag(torch.diagonal(c))
        return torch.diagonal(c).add(-1).pow(2).sum() + 0.0051 * off.pow(2).sum()
    return loss_and_grads(official, z1, z2)


@pytest.mark.parametrize("module", [BarlowTwinsLoss, VICRegLoss])
def test_gram_form_allocates_no_d_by_d_buffer(module):
    N, D = 8, 300
    z1, z2 = embeddings(N, D)
    with fastssl.use_backend("triton"), AllocationRecorder() as recorder:
        loss_and_grads(module(), z1, z2)
    assert (N, N) in recorder.shapes
    assert not any(torch.Size(shape).numel() >= D * D for shape in recorder.shapes), recorder.shapes


def test_module_and_reference_backend():
    z1, z2 = embeddings(16, 50, torch.float64)
    module = BarlowTwinsLoss(lambd=0.01)
    assert_close(module(z1, z2), barlow_twins_loss_original(z1, z2, lambd=0.01))
    assert "lambd=0.01" in repr(module)


@pytest.mark.parametrize(
    "z1,z2,kwargs,error,message",
    [
        (torch.randn(8, 4), torch.randn(8, 5), {}, ValueError, r"z1 and z2 must be \(N, D\) of one shape"),
        (torch.randn(1, 4), torch.randn(1, 4), {}, ValueError, "at least 2 samples"),
        (torch.randn(8), torch.randn(8), {}, ValueError, "z1 must have at least 2 dimensions"),
        (torch.randn(8, 4).long(), torch.randn(8, 4), {}, TypeError, "z1 must be float"),
        (torch.randn(8, 4), torch.randn(8, 4), {"formulation": "dense"}, ValueError, "formulation must be"),
        (torch.randn(8, 4), torch.randn(8, 4), {"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        (torch.randn(8, 4), torch.randn(8, 4), {"matmul": "cutlass"}, ValueError, "matmul must be one of"),
    ],
)
def test_bad_input(z1, z2, kwargs, error, message):
    with pytest.raises(error, match=message):
        barlow_twins_loss(z1, z2, **kwargs)


@pytest.mark.parametrize("loss_fn", [barlow_twins_loss, lambda a, b: VICRegLoss()(a, b)], ids=["barlow", "vicreg"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(loss_fn, backend, bad):
    z1, z2 = embeddings(8, 20)
    z2[3, 7] = bad
    with fastssl.use_backend(backend), pytest.raises(ValueError, match=r"(z2|y) contains NaN or Inf"):
        loss_fn(z1, z2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_fn,official", [(barlow_twins_loss, barlow_twins_loss_original),
                                              (vicreg_loss, vicreg_loss_original)], ids=["barlow", "vicreg"])
def test_cublas_gram_matmuls(loss_fn, official, dtype):
    """matmul="cublas": the Gram form's products by torch matmuls with float32 output, the
    rest on the kernels; the accuracy rule against the official loss, as the kernel path."""
    z1, z2 = embeddings(16, 100, dtype)
    with fastssl.use_backend("triton"):
        got = loss_and_grads(lambda a, b: loss_fn(a, b, formulation="gram", matmul="cublas"), z1, z2)
        kernel = loss_and_grads(lambda a, b: loss_fn(a, b, formulation="gram"), z1, z2)
    base, exact = float32_baseline(functools.partial(loss_and_grads, official), z1, z2)
    for index, what in enumerate(("loss", "gradient of z1", "gradient of z2")):
        # 16-bit inputs: both paths multiply the same rounded operands exactly and accumulate
        # in float32, so the kernel path's error is the yardstick (plus the gradients' rounding).
        yardstick = base[index].to(dtype) if dtype == torch.float32 else kernel[index]
        atol = output_rounding(exact[index], dtype if index else torch.float32)
        assert_accurate(got[index], yardstick, exact[index], atol=atol, what=what)


def _worker(rank, world, formulation, z1, z2, out_dir):
    a = z1.chunk(world)[rank].clone().requires_grad_()
    b = z2.chunk(world)[rank].clone().requires_grad_()
    with fastssl.use_backend("triton"):
        loss = barlow_twins_loss(a, b, formulation=formulation)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("formulation", ["gram", "cross"])
def test_two_ranks_equal_one_process(formulation, tmp_path):
    z1, z2 = embeddings(2 * 12, 40)
    run_distributed(_worker, formulation, z1, z2, str(tmp_path))
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    loss, g1, g2 = loss_and_grads(barlow_twins_loss_original, z1, z2)
    for part in parts:  # every rank returns the global loss
        assert_close(part["loss"], loss, rtol=1e-5, atol=1e-5)
    # DDP averages the ranks' gradients: each rank's gradient / 2 is the true one.
    assert_close(torch.cat([p["g1"] for p in parts]) / 2, g1, rtol=1e-4, atol=1e-6)
    assert_close(torch.cat([p["g2"] for p in parts]) / 2, g2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- VICReg


VICREG_SHAPES = [(3, 5), (16, 100), (100, 40), (7, 129), (64, 64)]


def vicreg_embeddings(N, D, dtype=torch.float32, device="cpu"):
    x, y = embeddings(N, D, torch.float32, device)
    return (x * 0.3).to(dtype), y.to(dtype)  # some features below unit std: the hinge is active


def _vicreg_autocast_baseline(x, y, dtype=torch.bfloat16):
    """The official loss with centering and statistics in float32 and the covariance
    matmuls in ``dtype``."""
    def official(a, b):
        N, D = a.shape
        loss = 25 * torch.nn.functional.mse_loss(a.float(), b.float())
        for z in (a, b):
            zc = z.float() - z.float().mean(0)
            loss = loss + 25 / 2 * torch.relu(1 - torch.sqrt(zc.var(0) + 1e-4)).mean()
            cov = autocast_matmul(zc.T, zc, dtype) / (N - 1)
            loss = loss + (cov.square().sum() - torch.diagonal(cov).square().sum()) / D
        return loss
    return loss_and_grads(official, x, y)


def vicreg_error_terms(x, y, dtype):
    """(loss atol, [gradient cancellation per view]) from float64 values, as for Barlow
    Twins: rounding the covariance operands Xc to ``dtype`` changes the loss by about
    eps/2 * sum |dL/dXc| |Xc|, and the gradient is the centering's projection of
    4 G Xc / (D (N-1)^2) + Xc * d, so float32 rounding is relative to those terms."""
    N, D = x.shape
    loss_atol, cancellation = 0.0, []
    for z in (x, y):
        zc = (z.double() - z.double().mean(0)).requires_grad_()
        cov = zc.T @ zc / (N - 1)
        penalty = (cov.square().sum() - torch.diagonal(cov).square().sum()) / D
        penalty.backward()
        if dtype != torch.float32:
            loss_atol += torch.finfo(dtype).eps / 2 * (zc.grad * zc).abs().sum().item()
        matrix_term = 4 * (zc @ zc.T) @ zc / (D * (N - 1) ** 2)
        var = zc.detach().square().sum(0) / (N - 1)
        diagonal_term = zc * (4 * var / (D * (N - 1)) + 25 / (2 * D * (N - 1) * torch.sqrt(var + 1e-4)))
        invariance = 50 * (x.double() - y.double()).abs().max() / x.numel()
        cancellation.append(4 * torch.finfo(torch.float32).eps
                            * (matrix_term.abs().max() + diagonal_term.abs().max() + invariance).item())
    return loss_atol, cancellation


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("formulation", ["gram", "cross"])
@pytest.mark.parametrize("N,D", VICREG_SHAPES, ids=[str(s) for s in VICREG_SHAPES])
def test_vicreg_loss_and_gradients_equal_official(kernel_device, dtype, formulation, N, D, poisoned_outputs):
    x, y = vicreg_embeddings(N, D, dtype, kernel_device)
    with fastssl.use_backend("triton"):
        loss, gx, gy = loss_and_grads(VICRegLoss(formulation=formulation), x, y)
    exact = loss_and_grads(vicreg_loss_original, x.double(), y.double())
    base = loss_and_grads(lambda a, b: vicreg_loss_original(a.float(), b.float()), x, y) \
        if dtype == torch.float32 else _vicreg_autocast_baseline(x, y, dtype)
    assert gx.dtype == dtype
    operand_atol, cancellation = vicreg_error_terms(x, y, dtype)
    assert_accurate(loss, base[0], exact[0], atol=output_rounding(exact[0], torch.float32) + operand_atol,
                    what="loss")
    for got, baseline, expected, bound in zip((gx, gy), base[1:], exact[1:], cancellation):
        assert_accurate(got, baseline, expected, atol=output_rounding(expected, dtype) + bound, what="gradient")


@pytest.mark.parametrize("formulation", ["gram", "cross"])
@pytest.mark.parametrize("N,D", [(16, 100), (100, 40), (7, 129)])
def test_vicreg_reference_backend_equals_official(formulation, N, D):
    x, y = vicreg_embeddings(N, D, torch.float64)
    loss, gx, gy = loss_and_grads(lambda a, b: VICRegLoss(formulation=formulation)(a, b), x, y)
    expected, ex, ey = loss_and_grads(vicreg_loss_original, x, y)
    assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    assert_close(gx, ex, rtol=1e-9, atol=1e-12)
    assert_close(gy, ey, rtol=1e-9, atol=1e-12)


def _vicreg_worker(rank, world, backend, formulation, x, y, out_dir):
    a = x.chunk(world)[rank].clone().requires_grad_()
    b = y.chunk(world)[rank].clone().requires_grad_()
    with fastssl.use_backend(backend):
        loss = VICRegLoss(formulation=formulation)(a, b)
    loss.backward()
    torch.save({"loss": loss.detach(), "gx": a.grad, "gy": b.grad}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("backend,formulation", [("reference", "auto"), ("triton", "gram"), ("triton", "cross")])
def test_vicreg_two_ranks_equal_official_semantics(backend, formulation, tmp_path):
    x, y = vicreg_embeddings(2 * 10, 30, torch.float64 if backend == "reference" else torch.float32)
    run_distributed(_vicreg_worker, backend, formulation, x, y, str(tmp_path))
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # The official code's invariance term is per rank; variance and covariance are global.
    # DDP's average of the ranks' gradients equals the gradient of the mean of their losses.
    def mean_of_rank_losses(a, b):
        halves = zip(a.chunk(2), b.chunk(2))
        repr_loss = sum(torch.nn.functional.mse_loss(p, q) for p, q in halves) / 2
        return vicreg_loss_original(a, b) - 25 * torch.nn.functional.mse_loss(a, b) + 25 * repr_loss
    loss, gx, gy = loss_and_grads(mean_of_rank_losses, x.double(), y.double())
    # float32 kernels against the float64 function: a few float32 units of the terms.
    tolerance = {} if backend == "reference" else dict(rtol=1e-5, atol=1e-5 * gx.abs().max().item())
    assert_close(sum(p["loss"] for p in parts).double() / 2, loss, **tolerance)
    assert_close(torch.cat([p["gx"] for p in parts]).double() / 2, gx, **tolerance)
    assert_close(torch.cat([p["gy"] for p in parts]).double() / 2, gy, **tolerance)


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["barlow", "vicreg"])
def test_one_sample_at_three_times_the_norm_keeps_16_bit_gradients_accurate(kernel_device, dtype, loss,
                                                                           poisoned_outputs):
    """The recipe's D = 8192 on the default path (N < D: the Gram form). The N x N Gram
    matrices' entries are squared row norms, about D; one sample at 3x the others' norm puts
    its entry near 9 D = 73,728, past float16's 65504, and the backward once cast them to
    float16 unscaled: non-finite gradients where the float64 reference's are at most 0.43."""
    N, D = 64, 8192
    z1, z2 = (vicreg_embeddings if loss == "vicreg" else embeddings)(N, D, torch.float32, kernel_device)
    z1[0] *= 3
    z1, z2 = z1.to(dtype), z2.to(dtype)
    if loss == "barlow":
        fn, official, baseline = barlow_twins_loss, barlow_twins_loss_original, _autocast_official
        gradient_atols = standardization_cancellation(z1, z2)
    else:
        fn, official, baseline = vicreg_loss, vicreg_loss_original, _vicreg_autocast_baseline
        gradient_atols = vicreg_error_terms(z1, z2, dtype)[1]
    with fastssl.use_backend("triton"):
        got = loss_and_grads(fn, z1, z2)
    exact = loss_and_grads(official, z1.double(), z2.double())
    base = baseline(z1, z2, dtype)
    for index, (value, expected, atol) in enumerate(zip(got[1:], exact[1:], gradient_atols)):
        assert torch.isfinite(value).all()
        assert_accurate(value, base[index + 1], expected, atol=output_rounding(expected, dtype) + atol,
                        what=f"gradient of view {index + 1}")
