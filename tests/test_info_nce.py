"""fastssl.ops.info_nce and its modules: values and gradients against the float64 reference
under the accuracy rule, lightly's NTXentLoss and MoCo v3's loss, no N x N buffer, custom op
and torch.compile, bad input, and two gloo processes against one."""

import functools
import os
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate, assert_close, float32_baseline, output_rounding, worst
from conftest import AllocationRecorder, kernel_devices
from distributed import run_distributed

import fastssl
from fastssl.nn import InfoNCELoss, NTXentLoss
from fastssl.ops import info_nce
from fastssl.reference.info_nce import info_nce_reference, moco_v3_contrastive_loss_original, ntxent_loss_original

info_nce_module = sys.modules["fastssl.ops.info_nce"]

MODES = {"moco": dict(), "clip": dict(symmetric=True), "ntxent": dict(symmetric=True, exclude_self=True),
         "own-view": dict(exclude_self=True)}


def rows(n, d, dtype=torch.float32, device="cpu"):
    return F.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)


def loss_and_grads(fn, query, key):
    query, key = query.detach().clone().requires_grad_(), key.detach().clone().requires_grad_()
    loss = fn(query, key)
    return (loss.detach(), *torch.autograd.grad(loss, [query, key], allow_unused=True, materialize_grads=True))


def reference(mode, temperature, one_direction=info_nce_reference):
    """The function under test on fastssl's reference backend (plain PyTorch, any dtype), each
    direction's loss computed by ``one_direction``."""
    def fn(query, key):
        with fastssl.use_backend("reference"), mock.patch.object(info_nce_module, "info_nce_reference",
                                                                 one_direction):
            return info_nce(query, key, temperature, **MODES[mode])
    return functools.partial(loss_and_grads, fn)


def recomputed_logits_direction(query, keys, own_view, temperature, row_offset=0):
    """``info_nce_reference`` as a two-pass kernel rounds it: the log-sum-exp from the logits
    of the forward, the probabilities ``exp(logit - lse)`` of the gradient from the logits
    computed again. The second computation rounds independently of the first (under
    SimulatedRounding), so the probabilities carry that rounding, amplified by |logit| <= 1/t:
    where every row has one candidate (N = 1) the reference's gradient is exactly 0, p = 1,
    in any rounding, and only this form shows how a float32 two-pass computation errs."""
    rows = torch.arange(query.shape[0], device=query.device)
    targets = rows + row_offset

    def logits():
        products = query @ keys.t() / temperature
        if own_view is None:
            return products
        own = (query @ own_view.t() / temperature).masked_fill(
            torch.arange(own_view.shape[0], device=query.device)[None, :] == targets[:, None], float("-inf"))
        return torch.cat([products, own], dim=1)

    forward, again = logits(), logits()
    lse = forward.logsumexp(1).detach()
    probabilities = (again.detach() - lse[:, None]).exp()
    # Gradient mean_i sum_j (p_ij - [j = target_i]) d logit_ij; value the forward's loss.
    surrogate = ((probabilities * again.masked_fill(probabilities == 0, 0)).sum(1) - again[rows, targets]).mean()
    return (lse - forward[rows, targets]).mean().detach() + surrogate - surrogate.detach()


def baseline_and_exact(mode, temperature, query, key):
    """The accuracy rule's baseline per output: the worst of the reference's float32 and
    simulated float32 runs and those of its recomputed-logits form."""
    base, exact = float32_baseline(reference(mode, temperature), query, key)
    recomputed, _ = float32_baseline(reference(mode, temperature, recomputed_logits_direction), query, key)
    return tuple(worst([one, other], value) for one, other, value in zip(base, recomputed, exact)), exact


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n,d", [(1, 8), (7, 5), (37, 20), (70, 64), (50, 128), (33, 256)])
def test_values_and_gradients_match_reference(kernel_device, mode, n, d, poisoned_outputs):
    query, key = rows(n, d, device=kernel_device), rows(n, d, device=kernel_device)
    with fastssl.use_backend("triton"):
        got = loss_and_grads(lambda q, k: info_nce(q, k, 0.1, **MODES[mode]), query, key)
    base, exact = baseline_and_exact(mode, 0.1, query, key)
    for value, baseline, expected, what in zip(got, base, exact, ("loss", "query gradient", "key gradient")):
        assert value.dtype == torch.float32
        assert_accurate(value, baseline, expected, atol=output_rounding(expected, torch.float32), what=what)


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["moco", "ntxent"])
def test_half_precision_rows(kernel_device, dtype, mode):
    """16-bit rows: exact products accumulated in float32; gradients rounded once to the
    rows' dtype. The baseline is the reference on the same 16-bit rows, in float32."""
    query, key = rows(45, 32, dtype, kernel_device), rows(45, 32, dtype, kernel_device)
    with fastssl.use_backend("triton"):
        got = loss_and_grads(lambda q, k: info_nce(q, k, 0.2, **MODES[mode]), query, key)
    exact = reference(mode, 0.2)(query.double(), key.double())
    base = reference(mode, 0.2)(query.float(), key.float())
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_accurate(got[0], base[0], exact[0], atol=output_rounding(exact[0], torch.float32), what="loss")
    for value, baseline, expected, what in zip(got[1:], base[1:], exact[1:], ("query gradient", "key gradient")):
        assert_accurate(value, baseline.to(dtype), expected, atol=output_rounding(expected, dtype), what=what)


def test_non_contiguous_rows():
    wide = rows(40, 48)
    query, key = wide[:, ::2], wide[:, 1::2]  # every other feature: strides (48, 2)
    assert not query.is_contiguous()
    with fastssl.use_backend("triton"):
        got = loss_and_grads(lambda q, k: info_nce(q, k, 0.1, symmetric=True, exclude_self=True), query, key)
    base, exact = float32_baseline(reference("ntxent", 0.1), query.contiguous(), key.contiguous())
    for value, baseline, expected in zip(got, base, exact):
        assert_accurate(value, baseline, expected, atol=output_rounding(expected, torch.float32))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ntxent_equals_lightly(backend):
    lightly_loss = pytest.importorskip("lightly.loss")
    out0, out1 = torch.randn(9, 16), torch.randn(9, 16)
    theirs = lambda a, b: lightly_loss.NTXentLoss(temperature=0.3)(a, b)  # noqa: E731
    with fastssl.use_backend(backend):
        if backend == "reference":  # float64: the same function, sums in another order
            got = loss_and_grads(NTXentLoss(0.3), out0.double(), out1.double())
            for value, expected in zip(got, loss_and_grads(theirs, out0.double(), out1.double())):
                assert_close(value, expected, rtol=1e-12, atol=1e-14, what="NT-Xent")
            return
        got = loss_and_grads(NTXentLoss(0.3), out0, out1)
    base, exact = float32_baseline(functools.partial(loss_and_grads, theirs), out0, out1)
    for value, baseline, expected in zip(got, base, exact):
        assert_accurate(value, baseline, expected, atol=output_rounding(expected, torch.float32), what="NT-Xent")
    # The benchmarks' plain-PyTorch original is lightly's function too (float64, another order).
    assert_close(ntxent_loss_original(out0.double(), out1.double(), 0.3), theirs(out0.double(), out1.double()),
                 rtol=1e-12, atol=1e-14, what="the plain-PyTorch original")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_infonce_loss_is_moco_v3s_contrastive_loss(backend):
    q, k = torch.randn(11, 24), torch.randn(11, 24)
    original = functools.partial(loss_and_grads, lambda a, b: moco_v3_contrastive_loss_original(a, b, 0.2))
    with fastssl.use_backend(backend):
        dtype = torch.float64 if backend == "reference" else torch.float32
        got = loss_and_grads(InfoNCELoss(0.2), q.to(dtype), k.to(dtype))
    assert not got[2].any(), "MoCo v3 sends no gradient to the momentum keys"
    if backend == "reference":
        for value, expected in zip(got, original(q.double(), k.double())):
            assert_close(value, expected, rtol=1e-12, atol=1e-14, what="MoCo v3")
        return
    base, exact = float32_baseline(original, q, k)
    for value, baseline, expected in zip(got[:2], base[:2], exact[:2]):
        assert_accurate(value, baseline, expected, atol=output_rounding(expected, torch.float32), what="MoCo v3")


@pytest.mark.parametrize("mode", ["moco", "ntxent"])
def test_no_n_by_n_buffer_forward_or_backward(mode):
    n, d = 40, 8
    query, key = rows(n, d).requires_grad_(), rows(n, d).requires_grad_()
    with fastssl.use_backend("triton"), AllocationRecorder() as recorder:
        loss = info_nce(query, key, 0.1, **MODES[mode])
        loss.backward()
    assert not any(len(shape) == 2 and shape[0] >= n and shape[1] >= n for shape in recorder.shapes), \
        recorder.shapes


def test_custom_op_and_torch_compile():
    query, key = rows(9, 16).requires_grad_(), rows(9, 16).requires_grad_()
    torch.library.opcheck(torch.ops.fastssl.info_nce_fwd.default, (query, key, None, 0.1, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def step(q, k):
        return info_nce(q * 1.0, k, 0.1, symmetric=True, exclude_self=True)

    with fastssl.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        expected = loss_and_grads(step, query, key)
        got = loss_and_grads(compiled, query, key)
    for value, reference_value in zip(got, expected):
        assert_close(value, reference_value, rtol=0, atol=0, what="compiled")


@pytest.mark.parametrize(
    "query,key,kwargs,error,message",
    [
        (torch.randn(4, 8), torch.randn(5, 8), {}, ValueError, r"query and key must be \(N, D\) of one shape"),
        (torch.randn(8), torch.randn(8), {}, ValueError, "query must have at least 2 dimensions"),
        (torch.randn(4, 8).long(), torch.randn(4, 8), {}, TypeError, "query must be float"),
        (torch.randn(0, 8), torch.randn(0, 8), {}, ValueError, "query must not be empty"),
        (torch.randn(4, 8), torch.full((4, 8), float("nan")), {}, ValueError, "key contains NaN or Inf"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": 0.0}, ValueError, "temperature must be a finite"),
        (torch.randn(4, 8), torch.randn(4, 8), {"temperature": -0.1}, ValueError, "temperature must be a finite"),
        (torch.randn(4, 8), torch.randn(4, 8), {"positives": "all"}, ValueError, "positives must be 'diagonal'"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input(query, key, kwargs, error, message, backend):
    kwargs = {"temperature": 0.1, **kwargs}
    with fastssl.use_backend(backend), pytest.raises(error, match=message):
        info_nce(query, key, **kwargs)


def test_float64_runs_on_the_reference_and_triton_says_why():
    query, key = rows(5, 4, torch.float64), rows(5, 4, torch.float64)
    assert info_nce(query, key, 0.1).dtype == torch.float64
    with fastssl.use_backend("triton"), pytest.raises(fastssl.BackendUnavailableError, match="float64"):
        info_nce(query, key, 0.1)


def _two_ranks(rank, world, backend, query, key, out_dir):
    local = [t.chunk(world)[rank].clone().requires_grad_() for t in (query, key)]
    with fastssl.use_backend(backend):
        ntxent = NTXentLoss(0.2, gather_distributed=True)(*local)
        ntxent.backward()
        grads = [t.grad.clone() for t in local]
        moco = InfoNCELoss(0.2)(local[0], local[1])
    torch.save({"ntxent": ntxent.detach(), "grads": grads, "moco": moco.detach()}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_ranks_equal_one_process(backend, tmp_path):
    # float64 on the reference backend: the equivalence is exact up to summation order.
    dtype = torch.float64 if backend == "reference" else torch.float32
    query, key = torch.randn(2 * 6, 16, dtype=dtype), torch.randn(2 * 6, 16, dtype=dtype)
    run_distributed(_two_ranks, backend, query, key, str(tmp_path))
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    with fastssl.use_backend(backend):
        loss, *grads = loss_and_grads(NTXentLoss(0.2), query, key)
        moco = InfoNCELoss(0.2)(query, key)
    # float32: each rank sums its rows' terms and the gradient in another order, a few float32
    # units of values of order 1.
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    # Each rank's loss is the mean over its rows; DDP averages the gradients over the ranks.
    assert_close(sum(p["ntxent"] for p in parts) / 2, loss, **tolerance, what="NT-Xent")
    assert_close(sum(p["moco"] for p in parts) / 2, moco, **tolerance, what="MoCo v3")
    for index, what in enumerate(("query", "key")):
        assert_close(torch.cat([p["grads"][index] for p in parts]) / 2, grads[index], **tolerance,
                     what=f"{what} gradient")
