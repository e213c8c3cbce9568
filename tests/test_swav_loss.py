import functools

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate, assert_close, float32_baseline

import fastssl
from fastssl.nn import SinkhornKnopp, SwAVLoss
from fastssl.reference import swav_loss_original

BATCH, K, DIM = 16, 30, 8


def random_step(n_crops: int, dtype=torch.float64):
    output = (torch.rand(n_crops * BATCH, K) * 2 - 1).to(dtype)  # cosine scores, as in SwAV
    embedding = F.normalize(torch.randn(n_crops * BATCH, DIM, dtype=dtype), dim=1)
    return output, embedding


def swav_loss_and_grad(output, n_crops, crops_for_assign, loss_fn=None):
    output = output.clone().requires_grad_()
    if loss_fn is None:
        loss, _ = swav_loss_original(output, BATCH, n_crops, crops_for_assign)
    else:
        loss = loss_fn(output)
    loss.backward()
    return loss.detach(), output.grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_crops,crops_for_assign", [(2, (0, 1)), (8, (0, 1)), (5, (1,))])
def test_loss_and_gradients_equal_swav(backend, dtype, n_crops, crops_for_assign):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the reference backend")
    output, _ = random_step(n_crops, dtype)
    module = SwAVLoss(n_crops=n_crops, crops_for_assign=crops_for_assign)
    with fastssl.use_backend(backend):
        loss, grad = swav_loss_and_grad(output, n_crops, crops_for_assign, module)
    original = functools.partial(swav_loss_and_grad, n_crops=n_crops, crops_for_assign=crops_for_assign)
    # The baseline: SwAV's code in the input dtype; in float32, the worst of that run and
    # simulated roundings of it (the loss sums cross-entropies, each a difference of a
    # log-sum-exp and q-weighted scores, so one run's rounding of it is a noisy draw).
    base, exact = float32_baseline(original, output) if dtype == torch.float32 else (original(output),
                                                                                      original(output.double()))
    assert_accurate(loss, base[0], exact[0], atol=1e-6, what="loss")
    assert_accurate(grad, base[1], exact[1], atol=1e-7, what="gradient")


def test_list_of_crops_equals_concatenated_tensor():
    output, _ = random_step(4, torch.float32)
    as_tensor = SwAVLoss(n_crops=4)(output)
    as_list = SwAVLoss()(list(output.chunk(4)))
    assert_close(as_tensor, as_list)


def test_bf16_scores():
    output, _ = random_step(4, torch.float32)
    loss = SwAVLoss(n_crops=4)(output.bfloat16())
    expected = SwAVLoss(n_crops=4)(output.bfloat16().float())
    assert loss.dtype == torch.float32
    assert_close(loss, expected)


def test_queue_over_several_steps_equals_swav():
    n_crops, queue_length = 4, 40  # full after 3 steps of 16
    prototypes = F.normalize(torch.randn(K, DIM, dtype=torch.float64), dim=1)
    loss_module = SwAVLoss(n_crops=n_crops, queue_length=queue_length, embedding_dim=DIM).double()
    queue = torch.zeros(2, queue_length, DIM, dtype=torch.float64)
    use_the_queue = False
    for step in range(5):
        output, embedding = random_step(n_crops)
        loss = loss_module(output, embedding, prototypes)
        expected, use_the_queue = swav_loss_original(
            output, BATCH, n_crops, queue=queue, embedding=embedding,
            prototypes=prototypes, use_the_queue=use_the_queue,
        )
        assert_close(loss, expected, rtol=1e-9, atol=1e-9, what=f"step {step}")
        assert_close(loss_module.queue, queue)
    assert use_the_queue


def test_queue_state_checkpoints():
    module = SwAVLoss(n_crops=2, queue_length=20, embedding_dim=DIM)
    output, embedding = random_step(2, torch.float32)
    module(output, embedding, torch.randn(K, DIM))
    restored = SwAVLoss(n_crops=2, queue_length=20, embedding_dim=DIM)
    restored.load_state_dict(module.state_dict())
    assert restored.queue_filled == module.queue_filled == BATCH
    assert_close(restored.queue, module.queue)


def test_sinkhorn_module_equals_function():
    scores = torch.randn(3, 20, 10)
    module = SinkhornKnopp(n_iters=5, eps=0.1)
    assert_close(module(scores), fastssl.ops.sinkhorn_knopp(scores, 0.1, 5))
    assert "n_iters=5" in repr(module)


@pytest.mark.parametrize(
    "make_module,make_input,message",
    [
        (lambda: SwAVLoss(), lambda: torch.randn(32, K), "construct SwAVLoss with n_crops"),
        (lambda: SwAVLoss(n_crops=3), lambda: torch.randn(32, K), r"\(n_crops \* B, dim\) with n_crops=3"),
        (lambda: SwAVLoss(), lambda: [torch.randn(8, K), torch.randn(9, K)], "crops must all be"),
        (lambda: SwAVLoss(), lambda: [torch.randn(8, K)], "at least 2 crops"),
        (lambda: SwAVLoss(crops_for_assign=(0, 5)), lambda: [torch.randn(8, K)] * 3, r"crops_for_assign \[5\]"),
        (lambda: SwAVLoss(n_crops=2, queue_length=8, embedding_dim=DIM), lambda: torch.randn(16, K),
         "needs embeddings and prototypes"),
        (lambda: SwAVLoss(), lambda: [torch.randn(8, K).long()] * 2, r"scores\[0\] must be float"),
    ],
)
def test_bad_input(make_module, make_input, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_module()(make_input())


def test_bad_construction():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SwAVLoss(temperature=0)
    with pytest.raises(TypeError, match="embedding_dim"):
        SwAVLoss(queue_length=10)
    with pytest.raises(ValueError, match="crops_for_assign must name"):
        SwAVLoss(crops_for_assign=())
