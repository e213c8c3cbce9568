"""Run a function on ``world_size`` gloo processes (CPU), for distributed equivalence tests."""

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` in each process; ``fn`` saves what it computes
    (e.g. with torch.save under a tmp_path passed in ``args``). Raises if a process fails."""
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
