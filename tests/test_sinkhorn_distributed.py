"""world_size=2 (gloo) results equal one process on the concatenated batch."""

import os

import pytest
import torch
from accuracy import assert_close
from distributed import run_distributed

import fastssl
from fastssl.nn import SwAVLoss
from fastssl.ops import sinkhorn_knopp
from fastssl.reference import sinkhorn_knopp_original


def _sinkhorn_worker(rank, world_size, backend, scores, out_dir):
    local = scores.chunk(world_size, dim=-2)[rank]
    with fastssl.use_backend(backend):
        q = sinkhorn_knopp(local, eps=0.05, n_iters=3)  # group=None: the default group
    original = sinkhorn_knopp_original(
        local.double().clone(), 0.05, 3, group=torch.distributed.group.WORLD
    ) if local.dim() == 2 else None
    torch.save({"q": q, "original": original}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("shape", [(2 * 37, 50), (3, 2 * 20, 7), (2 * 9, 20000)])
def test_sinkhorn_two_ranks_equal_one_process(backend, shape, tmp_path):
    scores = torch.rand(shape) * 2 - 1
    run_distributed(_sinkhorn_worker, backend, scores, str(tmp_path))
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    with fastssl.use_backend(backend):
        expected = sinkhorn_knopp(scores, eps=0.05, n_iters=3)
    assert_close(torch.cat([p["q"] for p in parts], dim=-2), expected, rtol=1e-5, atol=1e-6)
    if len(shape) == 2:  # and both equal SwAV's distributed original
        original = torch.cat([p["original"] for p in parts])
        assert_close(expected.double(), original, rtol=1e-5, atol=1e-6)


def _swav_worker(rank, world_size, scores, out_dir):
    local = [crop.chunk(world_size)[rank].clone().requires_grad_() for crop in scores]
    loss = SwAVLoss()(local)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [c.grad for c in local]}, os.path.join(out_dir, f"{rank}.pt"))


def test_swav_loss_two_ranks_equal_one_process(tmp_path):
    # float64: the equivalence is exact, so neither side's float32 summation order matters.
    scores = [torch.randn(2 * 12, 30, dtype=torch.float64) for _ in range(4)]
    run_distributed(_swav_worker, scores, str(tmp_path))
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    full = [s.clone().requires_grad_() for s in scores]
    loss = SwAVLoss()(full)
    loss.backward()
    # Each rank's loss is its local mean; DDP averages gradients over ranks, so the mean
    # of the rank losses and the sum of rank gradients / world_size give the global ones.
    assert_close(sum(p["loss"] for p in parts) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    for crop, full_crop in enumerate(full):
        grads = torch.cat([p["grads"][crop] for p in parts]) / 2
        assert_close(grads, full_crop.grad, rtol=1e-5, atol=1e-7)
