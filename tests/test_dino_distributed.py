"""DINO center and gradients with world_size=2 (gloo) equal one process on the whole batch."""

import os

import pytest
import torch
from accuracy import assert_close
from distributed import run_distributed

import fastssl
from fastssl.nn import DINOLoss

NCROPS, B, K, STEPS = 4, 6, 64, 3


def rank_rows(x: torch.Tensor, n_crops: int, rank: int, world: int) -> torch.Tensor:
    """This rank's images of every crop, crops kept stacked."""
    return torch.cat([crop.chunk(world)[rank] for crop in x.chunk(n_crops)])


def _worker(rank, world, backend, async_center, batches, out_dir):
    loss_fn = DINOLoss(K, NCROPS, 0.04, 0.07, 2, STEPS, async_center=async_center)
    results = []
    for epoch, (student, teacher) in enumerate(batches):
        local = rank_rows(student, NCROPS, rank, world).requires_grad_()
        with fastssl.use_backend(backend):
            loss = loss_fn(local, rank_rows(teacher, 2, rank, world), epoch)
        loss.backward()
        results.append({"loss": loss.detach(), "grad": local.grad})
    loss_fn.apply_center_update()
    torch.save({"steps": results, "center": loss_fn.center}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("async_center", [False, True])
def test_two_ranks_equal_one_process(backend, async_center, tmp_path):
    batches = [(torch.randn(NCROPS * B, K) * 2, torch.randn(2 * B, K) * 2 + i) for i in range(STEPS)]
    run_distributed(_worker, backend, async_center, batches, str(tmp_path))
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    single = DINOLoss(K, NCROPS, 0.04, 0.07, 2, STEPS, async_center=async_center)
    for epoch, (student, teacher) in enumerate(batches):
        full = student.clone().requires_grad_()
        with fastssl.use_backend(backend):
            loss = single(full, teacher, epoch)
        loss.backward()
        rank_losses = [p["steps"][epoch]["loss"] for p in parts]
        assert_close(sum(rank_losses) / 2, loss.detach(), rtol=1e-5, atol=1e-5)
        # DDP averages gradients over ranks: each rank's gradient of its local mean, / 2.
        grads = [p["steps"][epoch]["grad"] for p in parts]
        for crop in range(NCROPS):
            expected = full.grad.chunk(NCROPS)[crop]
            got = torch.cat([g.chunk(NCROPS)[crop] for g in grads]) / 2
            assert_close(got, expected, rtol=1e-4, atol=1e-7)
    single.apply_center_update()
    for p in parts:
        assert_close(p["center"], single.center, rtol=1e-5, atol=1e-6)
