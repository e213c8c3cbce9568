"""The gloo process pool of tests/distributed.py: a rank's failure reaches the test with its
traceback, a rank left waiting in a collective is replaced, and the next test runs."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed


def _fail_on_rank_0(rank, world_size):
    if rank == 0:
        raise ValueError("rank 0 fails before the all-reduce")
    dist.all_reduce(torch.ones(1))  # rank 1 waits here for a rank that never comes


def _all_reduce(rank, world_size, path):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    torch.save(value, path / f"{rank}.pt")


def test_a_failing_rank_fails_the_test_and_the_next_run_works(tmp_path):
    with pytest.raises(RuntimeError, match="rank 0 fails before the all-reduce"):
        run_distributed(_fail_on_rank_0)
    run_distributed(_all_reduce, tmp_path)
    assert [torch.load(tmp_path / f"{rank}.pt").item() for rank in range(2)] == [3.0, 3.0]
