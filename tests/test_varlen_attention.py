import importlib
import math

import pytest
import torch
from accuracy import assert_accurate, assert_close, float32_baseline, output_rounding
from conftest import kernel_devices

import fastssl
from fastssl.ops import varlen_attention
from fastssl.ops.varlen_attention import _schedule, length_classes
from fastssl.reference.attention import varlen_attention_reference


def cu_seqlens_of(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def fused_qkv(T, H, D, dtype, device):
    """A leaf (T, 3 * H * D) tensor, as a fused qkv projection writes it; q, k and v are
    its non-contiguous views (row stride 3 * H * D)."""
    return torch.randn(T, 3 * H * D, device=device).to(dtype).requires_grad_()


def attention_and_grads(fn, qkv, grad_out, H, D):
    qkv = qkv.detach().clone().requires_grad_()
    q, k, v = qkv.reshape(qkv.shape[0], 3, H, D).unbind(1)
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), qkv.grad.reshape(qkv.shape[0], 3, H, D).unbind(1)


def check_against_reference(qkv, cu_seqlens, H, D, dtype, grad_out=None, **kwargs):
    """Kernel output and dq, dk, dv vs the float64 reference, within 2x the error of the
    reference computed in ``dtype`` (plus one unit of ``dtype`` at the largest value).
    ``grad_out``: the output's gradient (default: standard normal draws)."""
    T = qkv.shape[0]
    if grad_out is None:
        grad_out = torch.randn(T, H, D, device=qkv.device).to(dtype)
    with fastssl.use_backend("triton"):
        out, grads = attention_and_grads(lambda q, k, v: varlen_attention(q, k, v, cu_seqlens, **kwargs),
                                         qkv, grad_out, H, D)
    reference = lambda q, k, v: varlen_attention_reference(q, k, v, cu_seqlens)  # noqa: E731
    exact, exact_grads = attention_and_grads(reference, qkv.double(), grad_out.double(), H, D)
    base, base_grads = attention_and_grads(reference, qkv, grad_out, H, D)
    assert out.dtype == dtype and out.is_contiguous() and all(g.dtype == dtype for g in grads)
    assert_accurate(out, base, exact, atol=output_rounding(exact, dtype), what="out")
    for name, grad, base_grad, exact_grad in zip("qkv", grads, base_grads, exact_grads):
        assert_accurate(grad, base_grad, exact_grad, atol=output_rounding(exact_grad, dtype), what=f"d{name}")
    return out, grads


# Every length of the recipes that fits the interpreter, in a mixed order.
MIXED_LENGTHS = [197, 37, 1, 257, 50, 7]


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_recipe_lengths_match_reference(kernel_device, dtype, poisoned_outputs):
    H, D = 2, 64
    cu_seqlens = cu_seqlens_of(MIXED_LENGTHS, kernel_device)
    qkv = fused_qkv(sum(MIXED_LENGTHS), H, D, dtype, kernel_device)
    check_against_reference(qkv, cu_seqlens, H, D, dtype)


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("D", [32, 128])
def test_other_head_dims(kernel_device, D, poisoned_outputs):
    lengths, H = [50, 1, 90], 1
    qkv = fused_qkv(sum(lengths), H, D, torch.bfloat16, kernel_device)
    check_against_reference(qkv, cu_seqlens_of(lengths, kernel_device), H, D, torch.bfloat16)


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
def test_deterministic_backward_is_reproducible_and_accurate(kernel_device, poisoned_outputs):
    lengths, H, D, dtype = [37, 130, 50], 2, 64, torch.bfloat16
    cu_seqlens = cu_seqlens_of(lengths, kernel_device)
    qkv = fused_qkv(sum(lengths), H, D, dtype, kernel_device)
    _, first = check_against_reference(qkv, cu_seqlens, H, D, dtype, deterministic=True)
    grad_out = torch.randn(sum(lengths), H, D, device=kernel_device).to(dtype)
    with fastssl.use_backend("triton"):
        runs = [attention_and_grads(lambda q, k, v: varlen_attention(q, k, v, cu_seqlens, deterministic=True),
                                    qkv, grad_out, H, D)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
def test_random_mix_with_max_seqlen(kernel_device, poisoned_outputs):
    H, D, dtype = 2, 64, torch.float16
    lengths = torch.randint(1, 100, (5,)).tolist() + [int(torch.randint(65, 200, ()))]
    lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    qkv = fused_qkv(sum(lengths), H, D, dtype, kernel_device)
    check_against_reference(qkv, cu_seqlens_of(lengths, kernel_device), H, D, dtype, max_seqlen=max(lengths))


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
def test_long_sequences_use_the_long_class(kernel_device, poisoned_outputs):
    # 513 tokens: the first length of the long class (128 x 64 forward tiles), with a short one.
    lengths, H, D, dtype = [513, 20], 1, 64, torch.bfloat16
    qkv = fused_qkv(sum(lengths), H, D, dtype, kernel_device)
    check_against_reference(qkv, cu_seqlens_of(lengths, kernel_device), H, D, dtype, max_seqlen=513)


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype,logit", [(torch.float16, -12.0), (torch.bfloat16, -100.0)])
def test_rows_of_very_negative_logits_get_finite_accurate_gradients(kernel_device, dtype, logit, deterministic,
                                                                    poisoned_outputs):
    """One 37-token sequence (DINO's local crop: not a multiple of the 64-key tile) whose every
    logit is about ``logit``. The softmax is shift-invariant, so the output is ordinary, but
    lse is very negative (log2 units: -12 fp16, -139 bf16): the dK/dV tile's padding keys
    (k = 0, score 0) once got P = exp2(-lse), dS = -P * delta overflowed the 16-bit range
    (and float32's at -139), and dS K = inf * 0 made every dQ row NaN."""
    T, H, D = 37, 1, 32
    a = math.sqrt(-logit / math.sqrt(D))  # q = a, k = -a: q.k / sqrt(D) = logit
    q = a + 0.01 * torch.randn(T, H, D)
    k = -a + 0.01 * torch.randn(T, H, D)
    v = 4 + torch.randn(T, H, D)
    qkv = torch.stack([q, k, v], 1).reshape(T, 3 * H * D).to(kernel_device, dtype).requires_grad_()
    grad_out = torch.ones(T, H, D, device=kernel_device, dtype=dtype)
    _, grads = check_against_reference(qkv, cu_seqlens_of([T], kernel_device), H, D, dtype, grad_out=grad_out,
                                       deterministic=deterministic)
    assert all(torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("lengths,max_seqlen", [
    ([37, 200, 20], 60),  # the 65..512 class gets no tiles at all
    ([300, 300, 300], 100),  # its tiles outnumber the class's capacity
])
def test_max_seqlen_shorter_than_a_sequence_stops_the_kernels(lengths, max_seqlen):
    """Unvalidated, a too-short max_seqlen would leave tiles without a program and their rows
    of the output unwritten; the schedule kernel's device-side assert stops instead (on a GPU,
    a device-side assert error at the next synchronization)."""
    q, k, v = torch.randn(3, sum(lengths), 1, 32).unbind(0)
    cu_seqlens = cu_seqlens_of(lengths)
    with fastssl.use_backend("triton"):
        with pytest.raises(Exception, match="a sequence is longer than max_seqlen, or cu_seqlens is malformed"):
            varlen_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, validate=False)
        exact = varlen_attention(q, k, v, cu_seqlens, max_seqlen=max(lengths), validate=False)
    assert_close(exact, varlen_attention_reference(q, k, v, cu_seqlens), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_neco_resolution_on_gpu(deterministic):
    lengths, H, D, dtype = [1370, 50, 1370, 257, 50, 50, 197, 37], 6, 64, torch.bfloat16
    qkv = fused_qkv(sum(lengths), H, D, dtype, "cuda")
    check_against_reference(qkv, cu_seqlens_of(lengths, "cuda"), H, D, dtype, max_seqlen=1370,
                            deterministic=deterministic)


def test_views_and_contiguous_copies_give_identical_results():
    lengths, H, D = [37, 70], 2, 32
    cu_seqlens = cu_seqlens_of(lengths)
    q, k, v = torch.randn(sum(lengths), 3, H, D).unbind(1)
    assert not q.is_contiguous()
    with fastssl.use_backend("triton"):
        from_views = varlen_attention(q, k, v, cu_seqlens, scale=0.3)
        from_copies = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, scale=0.3)
    assert torch.equal(from_views, from_copies)
    base, exact = float32_baseline(lambda *qkv: varlen_attention_reference(*qkv, cu_seqlens, scale=0.3), q, k, v)
    assert_accurate(from_views, base, exact, atol=output_rounding(exact, torch.float32), what="attention")


def test_empty_sequences_contribute_nothing():
    cu_seqlens = torch.tensor([0, 0, 5, 5, 9, 9], dtype=torch.int32)
    q, k, v = torch.randn(3, 9, 2, 32).unbind(0)
    with fastssl.use_backend("triton"):
        out = varlen_attention(q, k, v, cu_seqlens)
    expected = varlen_attention_reference(q, k, v, torch.tensor([0, 5, 9], dtype=torch.int32))
    assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_tile_schedule_follows_the_length_classes():
    lengths = [700, 37, 0, 64, 65, 130, 1]
    shapes = [(length_class.max_len, length_class.forward[0]) for length_class in length_classes(64, 2)]
    plans = _schedule(cu_seqlens_of(lengths), sum(lengths), 0, shapes)
    starts = cu_seqlens_of(lengths)[:-1].tolist()
    tiles = []
    for shape, table in plans:
        entries = table.reshape(-1, 4)
        used = entries[entries[:, 1] > 0]
        tiles.append([(shape.rows, *entry) for entry in used.tolist()])
    short, medium, long = tiles
    assert [(seq, row) for _, _, _, row, seq in short] == [(1, 0), (3, 0), (6, 0)]
    assert [(seq, row) for _, _, _, row, seq in medium] == [(4, 0), (4, 64), (5, 0), (5, 64), (5, 128)]
    assert [(seq, row) for _, _, _, row, seq in long] == [(0, r) for r in range(0, 700, 128)]
    for _, start, length, _, seq in short + medium + long:
        assert (start, length) == (starts[seq], lengths[seq])


def test_malformed_cu_seqlens_without_validation_stay_in_bounds():
    q, k, v = torch.randn(3, 10, 1, 32).unbind(0)
    bad = torch.tensor([0, 8, 4, 50], dtype=torch.int32)  # decreasing, and past the end
    with fastssl.use_backend("triton"):
        varlen_attention(q, k, v, bad, validate=False)  # wrong values, but no out-of-bounds access
        with pytest.raises(ValueError, match="non-decreasing"):
            varlen_attention(q, k, v, bad)


def test_reference_gradcheck():
    q, k, v = (torch.randn(9, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 2, 3, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda q, k, v: varlen_attention_reference(q, k, v, cu_seqlens), (q, k, v),
                                    fast_mode=True)


def test_reference_backend_and_float64():
    q, k, v = torch.randn(3, 12, 2, 48, dtype=torch.float64).unbind(0)
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu_seqlens)  # the CPU default: the reference
    dense = torch.cat([torch.softmax(q[a:b].transpose(0, 1) @ k[a:b].permute(1, 2, 0) / math.sqrt(48), -1)
                       @ v[a:b].transpose(0, 1) for a, b in [(0, 5), (5, 12)]], dim=1).transpose(0, 1)
    assert_close(out, dense)


@pytest.mark.parametrize("what,tensor,reason", [
    ("head_dim", torch.randn(3, 12, 2, 48), "head_dim 32, 64, 128, got 48"),
    ("float64", torch.randn(3, 12, 2, 32, dtype=torch.float64), "float64 input runs on the reference"),
    ("stride", torch.randn(3, 12, 2, 64)[..., ::2], "unit stride along head_dim"),
])
def test_triton_refusals_name_the_reason(what, tensor, reason):
    q, k, v = tensor.unbind(0)
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)
    with fastssl.use_backend("triton"), pytest.raises(fastssl.BackendUnavailableError, match=reason):
        varlen_attention(q, k, v, cu_seqlens)


def _inputs(T=10, H=2, D=32, **overrides):
    args = dict(q=torch.randn(T, H, D), k=torch.randn(T, H, D), v=torch.randn(T, H, D),
                cu_seqlens=torch.tensor([0, 4, T], dtype=torch.int32))
    args.update(overrides)
    return args


@pytest.mark.parametrize("args,error,message", [
    (_inputs(cu_seqlens=torch.tensor([0, 7, 4, 10], dtype=torch.int32)), ValueError,
     r"non-decreasing, got cu_seqlens\[1\] = 7 > cu_seqlens\[2\] = 4"),
    (_inputs(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "must start at 0, got 1"),
    (_inputs(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError,
     r"end at the number of tokens q.shape\[0\] = 10, got 9"),
    (_inputs(cu_seqlens=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens must be int32, got torch.int64"),
    (_inputs(cu_seqlens=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D"),
    (_inputs(cu_seqlens=[0, 4, 10]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (_inputs(k=torch.randn(10, 2, 16)), ValueError, r"one shape .* got \(10, 2, 32\), \(10, 2, 16\)"),
    (_inputs(v=torch.randn(10, 2, 32).half()), TypeError, "one dtype"),
    (_inputs(q=torch.randn(10, 64)), ValueError, "q must have at least 3 dimensions"),
    (_inputs(q=torch.randn(10, 2, 32).long()), TypeError, "q must be float"),
    (_inputs(q=torch.randn(10, 2, 32, device="meta")), ValueError, "must be on one device"),
    (dict(_inputs(), max_seqlen=5), ValueError, r"max_seqlen=5 is shorter than the longest sequence \(6 tokens\)"),
    (dict(_inputs(), max_seqlen=0), ValueError, "max_seqlen must be >= 1"),
    (dict(_inputs(), scale=float("nan")), ValueError, "scale must be a finite number > 0"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_is_refused_before_any_kernel_runs(args, error, message, backend, monkeypatch):
    module = importlib.import_module("fastssl.ops.varlen_attention")  # the package exports the function

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(module, "_forward_triton", no_kernel)
    with fastssl.use_backend(backend), pytest.raises(error, match=message):
        varlen_attention(**args)


def test_custom_op_registration():
    q, k, v = (torch.randn(8, 1, 32, requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastssl.varlen_attention_fwd.default,
                          (q, k, v, cu_seqlens, 0, 0.2, False, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_traces_without_graph_break():
    lengths, H, D = [5, 20], 1, 32
    cu_seqlens = cu_seqlens_of(lengths)
    qkv = torch.randn(sum(lengths), 3 * H * D, requires_grad=True)

    def step(qkv):
        q, k, v = (qkv * 1.0).reshape(-1, 3, H, D).unbind(1)
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen=20).square().sum()

    with fastssl.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled(qkv).backward()
        grad = qkv.grad.clone()
        qkv.grad = None
        step(qkv).backward()
    assert_close(grad, qkv.grad)
