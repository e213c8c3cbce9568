"""Run a function on ``world_size`` gloo processes (CPU), for distributed equivalence tests.

The processes are started once per ``world_size`` and serve every test after that (starting
two Python processes that import torch costs seconds, more than most tests). They meet
through a file store, not a TCP port, so no port can be taken by another program between
choosing and binding it. Each task runs from the same state: the torch seed is reset first.
A task that fails on one rank can leave the others waiting in a collective: after the first
failure the others get a grace period, then the processes are replaced.
"""

import atexit
import multiprocessing
import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist

TASK_TIMEOUT_S = 600  # the longest test (a 2-process training run) takes about 5 s
GRACE_AFTER_FAILURE_S = 5  # then the others are taken to wait in a collective


def _serve(rank, world_size, store_path, tasks, results):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    while (task := tasks.get()) is not None:
        fn, args = task
        torch.manual_seed(0)
        try:
            fn(rank, world_size, *args)
            results.put((rank, None))
        except BaseException:  # reported to the test, which fails with this traceback
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class _Workers:
    def __init__(self, world_size: int):
        context = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self.store_dir = tempfile.TemporaryDirectory(prefix="fastssl-gloo-")
        store_path = os.path.join(self.store_dir.name, "store")
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, args=(rank, world_size, store_path, self.tasks[rank],
                                                               self.results), daemon=True)
                          for rank in range(world_size)]
        for process in self.processes:
            process.start()

    def run(self, fn, args) -> list[str]:
        """Run ``fn(rank, world_size, *args)`` on every rank; returns the failures' tracebacks."""
        for rank_tasks in self.tasks:
            rank_tasks.put((fn, args))
        failures, pending = [], self.world_size
        timeout = TASK_TIMEOUT_S
        while pending:
            try:
                rank, failure = self.results.get(timeout=timeout)
            except queue.Empty:
                failures.append(f"{pending} of {self.world_size} processes did not finish within {timeout} s")
                self.close(kill=True)
                break
            pending -= 1
            if failure is not None:
                failures.append(f"rank {rank}:\n{failure}")
                timeout = GRACE_AFTER_FAILURE_S
        if failures or not all(process.is_alive() for process in self.processes):
            self.close(kill=True)
        return failures

    def close(self, kill: bool = False) -> None:
        for process in self.processes:
            if kill:
                process.kill()
            elif process.is_alive():
                self.tasks[self.processes.index(process)].put(None)
        for process in self.processes:
            process.join(timeout=30)
        self.store_dir.cleanup()
        _workers.pop(self.world_size, None)


_workers: dict[int, _Workers] = {}


@atexit.register
def _close_all() -> None:
    for workers in list(_workers.values()):
        workers.close()


def run_distributed(fn, *args, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` in each process; ``fn`` saves what it computes
    (e.g. with torch.save under a tmp_path passed in ``args``). Raises if a process fails.
    ``fn`` and ``args`` must pickle (a module-level function, tensors, strings)."""
    if world_size not in _workers:
        _workers[world_size] = _Workers(world_size)
    failures = _workers[world_size].run(fn, args)
    if failures:
        raise RuntimeError("distributed run failed:\n" + "\n".join(failures))
