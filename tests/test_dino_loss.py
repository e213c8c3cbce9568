import pytest
import torch
import torch.nn.functional as F
from accuracy import UNIT_ROUNDOFF, assert_accurate, assert_close, float32_baseline, output_rounding
from conftest import kernel_devices

import fastssl
from fastssl.nn import DINOHead, DINOHeadLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss
from fastssl.ops import dino_cross_entropy
from fastssl.ops.dino_loss import dino_pair_weights
from fastssl.reference.dino import (
    DINOLossOriginal,
    dino_cross_entropy_reference,
    ibot_patch_loss_original,
    koleo_loss_original,
)


def loss_and_grad(fn, student):
    student = student.detach().clone().requires_grad_()
    loss = fn(student)
    loss.backward()
    return loss.detach(), student.grad


def reference_fn(teacher, S, T, teacher_temp, center, pairs, weights):
    def fn(student):
        loss, _ = dino_cross_entropy_reference(
            student, teacher, S, T, 0.1, teacher_temp, center, pairs, weights)
        return loss
    return fn


# (student crops, teacher crops, images, K)
SHAPES = [(2, 2, 1, 7), (10, 2, 3, 1000), (4, 2, 5, 257), (3, 1, 2, 5000), (1, 1, 37, 50)]


@pytest.mark.parametrize("kernel_device", kernel_devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("targets", ["logits", "probabilities"])
@pytest.mark.parametrize("S,T,B,K", SHAPES, ids=[str(s) for s in SHAPES])
def test_fused_loss_and_gradient_match_reference(kernel_device, dtype, targets, S, T, B, K, poisoned_outputs):
    device = kernel_device
    student = (torch.randn(S * B, K, device=device) * 3).to(dtype)
    if targets == "logits":
        teacher = (torch.randn(T * B, K, device=device) * 3).to(dtype)
        teacher_temp, center = 0.04, torch.randn(K, device=device) * 0.5
    else:
        teacher = torch.softmax(torch.randn(T * B, K, device=device) * 5, -1).to(dtype)
        teacher_temp, center = None, None
    pairs = dino_pair_weights(T, S, device) if S > 1 else torch.ones(T, S, device=device)
    weights = torch.rand(B, device=device)

    with fastssl.use_backend("triton"):
        loss, grad = loss_and_grad(lambda s: dino_cross_entropy(
            s, teacher, S, T, 0.1, teacher_temp, center, pairs, weights)[0], student)
    def reference(rows):
        return loss_and_grad(reference_fn(teacher.to(rows.dtype), S, T, teacher_temp, center, pairs, weights), rows)

    # The baseline: the worst of the float32 reference and simulated float32 roundings of it
    # (one run's error is a noisy draw: cross-entropies are differences of larger terms).
    base, exact = float32_baseline(reference, student)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Each cross-entropy is lse(s / 0.1) - <p_t, s / 0.1>, a difference of terms as large as
    # max|s| / 0.1: float32 resolves it to a few units of that, however small the result (a
    # near-one-hot teacher matching the student's maximum gives losses of 1e-24).
    difference_rounding = 4 * torch.finfo(torch.float32).eps * student.abs().max().item() / 0.1
    assert_accurate(loss, base[0], exact[0], atol=output_rounding(exact[0], torch.float32) + difference_rounding,
                    what="loss")
    # Each gradient entry is a difference of two probabilities (the student's softmax and the
    # teacher's target), each rounded to u relative: near 1 that is u absolute, which the float32
    # reference may escape by luck (seed 1395355557: 1 - 7e-18 against 0.99965, the kernel off
    # by 0.6 ulp of 1). Per unit of probability an entry weighs sum_i P[i, v] w_b / 0.1.
    probability_rounding = 2 * UNIT_ROUNDOFF * (pairs.sum(0).max() * weights.max()).item() / 0.1
    grad_atol = output_rounding(exact[1], dtype) + probability_rounding
    assert_accurate(grad, base[1].to(dtype), exact[1], atol=grad_atol, what="gradient")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_teacher_column_sum_for_the_center(backend):
    student, teacher = torch.randn(4 * 3, 100), torch.randn(2 * 3, 100)
    with fastssl.use_backend(backend):
        _, column_sum = dino_cross_entropy(student, teacher, 4, 2, 0.1, 0.04)
        _, none = dino_cross_entropy(student, torch.softmax(teacher, -1), 4, 2, 0.1, None)
    assert_close(column_sum, teacher.sum(0))
    assert none is None and not column_sum.requires_grad


def test_rows_with_a_larger_stride():
    wide = torch.randn(6 * 4, 300)
    student = wide[:, :257]  # row stride 300, unit column stride
    teacher = torch.randn(2 * 4, 300)[:, :257]
    with fastssl.use_backend("triton"):
        loss, _ = dino_cross_entropy(student, teacher, 6, 2, 0.1, 0.05)
    with fastssl.use_backend("reference"):
        expected, _ = dino_cross_entropy(student, teacher, 6, 2, 0.1, 0.05)
    assert_close(loss, expected)


def test_column_strided_input_is_refused_by_triton_with_the_reason():
    student = torch.randn(100, 4 * 3).t()
    with fastssl.use_backend("triton"), pytest.raises(fastssl.BackendUnavailableError, match="unit stride along K"):
        dino_cross_entropy(student, torch.randn(6, 100), 4, 2, 0.1, 0.04)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(student=torch.randn(10, 8), teacher=torch.randn(6, 8), n_student_crops=4), ValueError,
         "not a multiple of n_student_crops=4"),
        (dict(student=torch.randn(12, 8), teacher=torch.randn(6, 9), n_student_crops=4), ValueError,
         r"teacher must be \(n_teacher_crops \* B, K\) = \(6, 8\)"),
        (dict(student=torch.randn(12, 8), teacher=torch.randn(6, 8), n_student_crops=4, teacher_temp=0.0),
         ValueError, "teacher_temp must be a finite number > 0"),
        (dict(student=torch.randn(12, 8), teacher=torch.randn(6, 8), n_student_crops=4, center=torch.zeros(8)),
         ValueError, "center applies to teacher logits"),
        (dict(student=torch.randn(12, 8), teacher=torch.randn(6, 8), n_student_crops=4, teacher_temp=0.1,
              center=torch.zeros(7)), ValueError, "center must hold K=8 values"),
        (dict(student=torch.randn(12, 8).long(), teacher=torch.randn(6, 8), n_student_crops=4), TypeError,
         "student must be float"),
        (dict(student=torch.randn(12, 8), teacher=torch.randn(6, 8), n_student_crops=4,
              pair_weights=torch.ones(4, 2)), ValueError, r"pair_weights must be \(2, 4\)"),
        (dict(student=torch.zeros(0, 8), teacher=torch.randn(6, 8), n_student_crops=4), ValueError,
         "student must not be empty"),
    ],
)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        dino_cross_entropy(**kwargs)


def test_custom_ops_registration():
    S, T, B, K = 3, 2, 2, 40
    args = (torch.randn(S * B, K, requires_grad=True), torch.randn(T * B, K), torch.randn(K),
            dino_pair_weights(T, S), torch.full((B,), 0.5), S, T, 0.1, 0.04)
    torch.library.opcheck(torch.ops.fastssl.dino_cross_entropy_fwd.default, args)


def test_torch_compile_forward_and_backward():
    student, teacher = torch.randn(4 * 2, 64, requires_grad=True), torch.randn(2 * 2, 64)

    def step(s):
        return dino_cross_entropy(s * 1.0, teacher, 4, 2, 0.1, 0.04)[0]

    with fastssl.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(student)
        loss.backward()
        grad = student.grad.clone()
        student.grad = None
        step(student).backward()
    assert_close(grad, student.grad)


# ---------------------------------------------------------------- DINOLoss


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dino_loss_over_several_epochs_equals_official(backend):
    ncrops, B, K = 6, 4, 300
    ours = DINOLoss(K, ncrops, 0.04, 0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    official = DINOLossOriginal(K, ncrops, 0.04, 0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    for epoch in range(5):
        student, teacher = torch.randn(ncrops * B, K) * 2, torch.randn(2 * B, K) * 2 + 1
        with fastssl.use_backend(backend):
            loss, grad = loss_and_grad(lambda s: ours(s, teacher, epoch), student)
        expected, expected_grad = loss_and_grad(lambda s: official(s, teacher, epoch), student)
        assert_close(loss, expected, rtol=1e-5, atol=1e-5, what=f"epoch {epoch}")
        assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
        assert_close(ours.center, official.center, rtol=1e-5, atol=1e-6)


def test_dino_loss_accepts_lists_of_crops():
    loss_fn = DINOLoss(50, 4, 0.04, 0.04, 0, 2)
    student, teacher = torch.randn(4 * 3, 50), torch.randn(2 * 3, 50)
    as_tensor = DINOLoss(50, 4, 0.04, 0.04, 0, 2)(student, teacher, 0)
    as_lists = loss_fn(list(student.chunk(4)), list(teacher.chunk(2)), 0)
    assert_close(as_tensor, as_lists)


def test_async_center_is_applied_at_the_next_call():
    sync, delayed = DINOLoss(20, 4, 0.04, 0.04, 0, 3), DINOLoss(20, 4, 0.04, 0.04, 0, 3, async_center=True)
    first, second = torch.randn(8, 20), torch.randn(8, 20) + 3
    student = torch.randn(16, 20)
    sync(student, first, 0)
    delayed(student, first, 0)
    assert delayed.center.abs().sum() == 0  # pending
    sync_center_after_first = sync.center.clone()
    delayed(student, second, 1)  # applies the first update before computing
    assert_close(delayed.center, sync_center_after_first)
    delayed.apply_center_update()
    sync(student, second, 1)
    assert_close(delayed.center, sync.center)


def test_center_checkpoints_with_the_module():
    loss_fn = DINOLoss(20, 4, 0.04, 0.04, 0, 3)
    loss_fn(torch.randn(16, 20), torch.randn(8, 20), 0)
    restored = DINOLoss(20, 4, 0.04, 0.04, 0, 3)
    restored.load_state_dict(loss_fn.state_dict())
    assert_close(restored.center, loss_fn.center)
    assert list(loss_fn.state_dict()) == ["center"]  # the official key
    official = DINOLossOriginal(20, 4, 0.04, 0.04, 0, 3)
    official.center.normal_()
    restored.load_state_dict(official.state_dict())  # an official checkpoint loads as is
    assert_close(restored.center, official.center)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda f: f(torch.randn(10, 20), torch.randn(4, 20), 0), "not a multiple of n_student_crops=4"),
        (lambda f: f(torch.randn(16, 21), torch.randn(8, 21), 0), r"must be \(rows, out_dim=20\)"),
        (lambda f: f(torch.randn(16, 20), torch.randn(6, 20), 0), r"teacher must be \(n_teacher_crops \* B, K\)"),
        (lambda f: f(torch.randn(16, 20), torch.randn(8, 20), 3),
         "epoch 3 is outside the teacher temperature schedule"),
        (lambda f: f([torch.randn(4, 20), torch.randn(5, 20)], torch.randn(8, 20), 0), "crops must share one shape"),
    ],
)
def test_dino_loss_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(DINOLoss(20, 4, 0.04, 0.04, 0, 3))


def test_dino_loss_bad_construction():
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs must be in"):
        DINOLoss(20, 4, 0.04, 0.04, 5, 3)
    with pytest.raises(ValueError, match="ncrops must be >= 2"):
        DINOLoss(20, 1, 0.04, 0.04, 0, 3)


# ---------------------------------------------------------------- iBOT, KoLeo, head


def ibot_inputs(n_images=3, n_patches=20, K=120):
    masks = torch.rand(n_images, n_patches) < 0.4
    masks[0] = False  # an image without masked patches still counts in the division
    masks[1, :3] = True
    n = int(masks.sum())
    return masks, torch.randn(n, K) * 2, torch.randn(n, K) * 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ibot_patch_loss_equals_dinov2(backend):
    masks, student, teacher_logits = ibot_inputs()
    ibot = IBOTPatchLoss(120)
    probs = ibot.softmax_center_teacher(teacher_logits, 0.07).squeeze(0)
    with fastssl.use_backend(backend):
        loss, grad = loss_and_grad(lambda s: ibot.forward_masked(s, probs, masks), student)
    expected, expected_grad = loss_and_grad(lambda s: ibot_patch_loss_original(s, probs, masks), student)
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def ibot_gradient_rounding(teacher_logits, center, masks, teacher_temp=0.07, student_temp=0.1):
    """How far two float32 evaluations of iBOT's gradient may differ by rounding alone. An entry
    is (softmax(s / student_temp) - q) / (student_temp n_images n_masked(image)); in each
    evaluation q = softmax((t - c) / teacher_temp) carries the rounding of its argument,
    |t - c| / teacher_temp units of u relative, and both probabilities their own u."""
    argument = ((teacher_logits - center.view(1, -1)).abs().max() / teacher_temp).item()
    masked = masks.sum(1)
    weight = 1 / (student_temp * masks.shape[0] * masked[masked > 0].min().item())
    return 2 * weight * (argument + 2) * UNIT_ROUNDOFF


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ibot_fused_logits_path_equals_softmax_center_then_loss(backend):
    masks, student, teacher_logits = ibot_inputs()
    fused, unfused = IBOTPatchLoss(120, async_center=False), IBOTPatchLoss(120, async_center=False)
    for step in range(3):
        with fastssl.use_backend(backend):
            loss, grad = loss_and_grad(
                lambda s: fused.forward_masked(s, teacher_logits, masks, teacher_temp=0.07), student)
        rounding = ibot_gradient_rounding(teacher_logits, unfused.center, masks)  # the center this step uses
        probs = unfused.softmax_center_teacher(teacher_logits, 0.07).squeeze(0)
        unfused.update_center(teacher_logits)
        expected, expected_grad = loss_and_grad(lambda s: ibot_patch_loss_original(s, probs, masks), student)
        assert_close(loss, expected, rtol=1e-5, atol=1e-6, what=f"step {step}")
        assert_close(grad, expected_grad, rtol=0, atol=rounding, what=f"gradient, step {step}")
        assert_close(fused.center, unfused.center)
        teacher_logits = teacher_logits + 1.0


def test_ibot_n_masked_patches_and_bad_weights():
    masks, student, teacher = ibot_inputs()
    probs = torch.softmax(teacher, -1)
    ibot = IBOTPatchLoss(120)
    n = student.shape[0]
    weights = torch.rand(n)
    padded = ibot.forward_masked(torch.cat([student, student[:2]]), torch.cat([probs, probs[:2]]), masks,
                                 n_masked_patches=n, masks_weight=weights)
    assert_close(padded, ibot_patch_loss_original(student, probs, masks, masks_weight=weights))
    with pytest.raises(ValueError, match="one weight per masked patch"):
        ibot.forward_masked(student, probs, masks, masks_weight=weights[:-1])
    with pytest.raises(ValueError, match="2-D bool tensor"):
        ibot.forward_masked(student, probs, masks.float())


def test_koleo_equals_dinov2_and_rejects_bad_input():
    x = torch.randn(17, 32)
    assert_close(KoLeoLoss()(x), koleo_loss_original(x))
    x_bf16 = x.bfloat16()
    assert KoLeoLoss()(x_bf16).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B >= 2, D\)"):
        KoLeoLoss()(torch.randn(1, 32))


class OfficialDINOHeadShape(torch.nn.Module):
    """The official head's layout, with torch's weight_norm, to check state-dict compatibility."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=64, bottleneck_dim=16, use_bn=False):
        super().__init__()
        layers = [torch.nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(torch.nn.BatchNorm1d(hidden_dim))
        layers.append(torch.nn.GELU())
        for _ in range(nlayers - 2):
            layers.append(torch.nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(torch.nn.BatchNorm1d(hidden_dim))
            layers.append(torch.nn.GELU())
        layers.append(torch.nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = torch.nn.Sequential(*layers)
        self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("use_bn", [False, True])
def test_dino_head_loads_official_weights(use_bn):
    official = OfficialDINOHeadShape(32, 100, nlayers=4, use_bn=use_bn).eval()
    ours = DINOHead(32, 100, use_bn=use_bn, nlayers=4, hidden_dim=64, bottleneck_dim=16).eval()
    assert set(ours.state_dict()) == set(official.state_dict())
    ours.load_state_dict(official.state_dict())
    x = torch.randn(5, 32)
    assert_close(ours(x), official(x))
    assert not DINOHead(32, 100).last_layer.weight_g.requires_grad
    assert DINOHead(32, 100, norm_last_layer=False).last_layer.weight_g.requires_grad


# ---------------------------------------------------------------- real sizes on a GPU

GPU_CASES = [("DINO ViT-S", 10, 64, 65536), ("DINOv2 ViT-L", 10, 32, 131072)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,S,B,K", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_real_sizes_on_gpu(name, S, B, K, dtype, poisoned_outputs):
    student = (torch.randn(S * B, K, device="cuda") * 3).to(dtype)
    teacher = (torch.randn(2 * B, K, device="cuda") * 3).to(dtype)
    center = torch.randn(K, device="cuda")
    pairs, weights = dino_pair_weights(2, S, "cuda"), torch.full((B,), 1 / B, device="cuda")
    with fastssl.use_backend("triton"):
        loss, grad = loss_and_grad(lambda s: dino_cross_entropy(
            s, teacher, S, 2, 0.1, 0.04, center, pairs, weights)[0], student)
    exact = loss_and_grad(reference_fn(teacher.double(), S, 2, 0.04, center, pairs, weights), student.double())
    base = loss_and_grad(reference_fn(teacher.float(), S, 2, 0.04, center, pairs, weights), student.float())
    assert_accurate(loss, base[0], exact[0], atol=output_rounding(exact[0], torch.float32), what=f"{name} loss")
    assert_accurate(grad, base[1].to(dtype), exact[1], atol=output_rounding(exact[1], dtype), what="grad")


# ---------------------------------------------------------------- fused head + loss


def head_pair(state, dtype, K):
    student = DINOHead(32, K, hidden_dim=48, bottleneck_dim=16, norm_last_layer=False)
    teacher = DINOHead(32, K, hidden_dim=48, bottleneck_dim=16)
    student.load_state_dict(state[0])
    teacher.load_state_dict(state[1])
    return student.to(dtype), teacher.to(dtype)


def head_step(loss_fn, heads, x_student, x_teacher, epoch, fused):
    """One step's loss and student-head gradients, fused or head-then-loss."""
    student, teacher = heads
    student.zero_grad()
    x_student, x_teacher = x_student.to(student.mlp[0].weight.dtype), x_teacher.to(student.mlp[0].weight.dtype)
    with torch.no_grad():
        teacher_out = teacher.bottleneck(x_teacher) if fused else teacher(x_teacher)
    if fused:
        loss = loss_fn(student.bottleneck(x_student), student.last_layer, teacher_out, teacher.last_layer, epoch)
    else:
        loss = loss_fn(student(x_student), teacher_out, epoch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in student.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("chunk_size", [8192, 300, 257])
def test_fused_head_loss_equals_head_then_loss(backend, chunk_size):
    ncrops, B, K = 4, 3, 1000
    state = [DINOHead(32, K, hidden_dim=48, bottleneck_dim=16, norm_last_layer=False).state_dict(),
             DINOHead(32, K, hidden_dim=48, bottleneck_dim=16).state_dict()]
    fused = DINOHeadLoss(K, ncrops, 0.04, 0.07, 2, 4, chunk_size=chunk_size)
    exact_loss_fn = DINOLossOriginal(K, ncrops, 0.04, 0.07, 2, 4).double()
    base_loss_fn = DINOLossOriginal(K, ncrops, 0.04, 0.07, 2, 4)
    heads, exact_heads, base_heads = (head_pair(state, dtype, K) for dtype in
                                      (torch.float32, torch.float64, torch.float32))
    for epoch in range(3):
        x_student, x_teacher = torch.randn(ncrops * B, 32), torch.randn(2 * B, 32)
        with fastssl.use_backend(backend):
            loss, grads = head_step(fused, heads, x_student, x_teacher, epoch, fused=True)
        exact_loss, exact_grads = head_step(exact_loss_fn, exact_heads, x_student, x_teacher, epoch, fused=False)
        base_loss, base_grads = head_step(base_loss_fn, base_heads, x_student, x_teacher, epoch, fused=False)
        # The fused path rounds the logits slice by slice, differently from one matmul; any
        # float32 rounding of z = logits / tau_s moves the loss by up to eps * max|z|.
        with torch.no_grad():
            max_z = exact_heads[0](x_student.double()).abs().max() / 0.1
        logits_rounding = torch.finfo(torch.float32).eps * max_z.item()
        assert_accurate(loss, base_loss, exact_loss, what=f"loss, epoch {epoch}",
                        atol=output_rounding(exact_loss, torch.float32) + logits_rounding)
        for name in grads:
            assert_accurate(grads[name], base_grads[name], exact_grads[name],
                            atol=output_rounding(exact_grads[name], torch.float32), what=name)
        assert_close(fused.center.double(), exact_loss_fn.center, rtol=1e-5, atol=1e-6)


def test_fused_head_loss_bad_input():
    loss_fn = DINOHeadLoss(100, 4, 0.04, 0.04, 0, 2)
    features, teacher = torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="student_last_layer must be a layer or weight with out_dim=100"):
        loss_fn(features, torch.randn(99, 16), teacher, torch.randn(100, 16), 0)
    with pytest.raises(ValueError, match="must share D"):
        loss_fn(features, torch.randn(100, 15), teacher, torch.randn(100, 16), 0)
    with pytest.raises(ValueError, match="not a multiple of n_student_crops=4"):
        loss_fn(torch.randn(9, 16), torch.randn(100, 16), teacher, torch.randn(100, 16), 0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        DINOHeadLoss(100, 4, 0.04, 0.04, 0, 2, chunk_size=0)


def test_fused_head_loss_compiles():
    from fastssl.ops import dino_head_cross_entropy

    h, w = torch.randn(8, 16, requires_grad=True), torch.randn(200, 16, requires_grad=True)
    t, wt = torch.randn(4, 16), torch.randn(200, 16)

    def step(h, w):
        return dino_head_cross_entropy(h, w, t, wt, 4, 2, 0.1, 0.04, chunk_size=64)[0]

    with fastssl.use_backend("triton"):
        compiled = torch.compile(step, backend="aot_eager")
        compiled(h, w).backward()
        grads = (h.grad.clone(), w.grad.clone())
        h.grad = w.grad = None
        step(h, w).backward()
    assert_close(grads[0], h.grad)
    assert_close(grads[1], w.grad)


def test_dinov2_teacher_methods_on_dino_loss():
    loss_fn = DINOLoss(30, 4, 0.04, 0.04, 0, 2, async_center=True)
    teacher = torch.randn(6, 30)
    assert_close(loss_fn.softmax_center_teacher(teacher, 0.07), torch.softmax(teacher / 0.07, -1))
    loss_fn.update_center(teacher)
    loss_fn.apply_center_update()
    assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))
    q = loss_fn.sinkhorn_knopp_teacher(teacher, 0.07)
    assert_close(q, fastssl.ops.sinkhorn_knopp(teacher, 0.07, 3))
