"""Processes and devices: torchrun/DDP/FSDP2 setup and the state-dict calls that depend on it."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastssl.train.config import TrainConfig


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    fsdp: bool
    owns_process_group: bool  # initialized here (from torchrun's environment), so destroyed here

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_runtime(config: TrainConfig) -> Runtime:
    """Join the process group torchrun describes (or one already initialized) and pick the device."""
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and config.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = _pick_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return Runtime(rank, world_size, device, config.fsdp and world_size > 1, owns)


def _pick_device(requested) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return device


def stop_runtime(runtime: Runtime) -> None:
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_student(student: nn.Module, teacher, runtime: Runtime) -> nn.Module:
    """DDP around the student, or FSDP2 sharding of student and teacher (the teacher is
    sharded the same way, so the EMA update is a local operation on matching shards).

    FSDP gathers a unit's parameters in a hook on its ``forward``. The per-resolution
    forward (kernels off) calls each block's ``forward``, so every block is a unit; the
    packed forward calls the blocks' layers directly, so there the whole network is one
    unit (parameters are gathered for the forward; gradients and optimizer states stay
    sharded)."""
    if not runtime.distributed:
        return student
    if runtime.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in (student, teacher):
            if module is None:
                continue
            if getattr(module.backbone, "packed", None) is None:
                for block in _vit_blocks(module):
                    fully_shard(block)
            fully_shard(module)
        return student
    if runtime.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        return nn.parallel.DistributedDataParallel(student, device_ids=[runtime.device.index])
    return nn.parallel.DistributedDataParallel(student)


def deferred_gradient_sync(student: nn.Module):
    """A context in which backward accumulates the student's gradients without reducing them
    over the processes (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``), for
    the micro-batches of a step but its last; None in a single process."""
    if hasattr(student, "no_sync"):
        return student.no_sync
    if not hasattr(student, "set_requires_gradient_sync"):
        return None

    @contextlib.contextmanager
    def without_sync():
        student.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True)

    return without_sync


def _vit_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks: each becomes one FSDP unit (gathered just before it runs)."""
    blocks: list[nn.Module] = []
    for name, child in module.named_modules():
        if name.endswith("blocks") and isinstance(child, nn.Sequential):
            blocks.extend(child)
    return blocks


@contextlib.contextmanager
def gathered(module: nn.Module, runtime: Runtime):
    """Full parameters of an FSDP module for calls that bypass its ``forward`` (evaluation)."""
    if not runtime.fsdp:
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_model_state(module: nn.Module, runtime: Runtime) -> dict:
    if runtime.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().cpu() if torch.is_tensor(value) else value
            for key, value in module.state_dict().items()}


def load_full_model_state(module: nn.Module, state: dict, runtime: Runtime) -> None:
    if runtime.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def full_optimizer_state(student: nn.Module, optimizer, runtime: Runtime) -> dict:
    if runtime.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(student, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(student: nn.Module, optimizer, state: dict, runtime: Runtime) -> None:
    if runtime.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Not strict: parameters frozen so far (DINO's last layer in epoch 0) have no optimizer state yet.
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(student, optimizer, state, options=options)
    else:
        optimizer.load_state_dict(state)


def mean_over_processes(value: torch.Tensor, runtime: Runtime) -> float:
    """The mean of a scalar over processes (for logging)."""
    value = value.detach().float().clone()
    if runtime.distributed:
        dist.all_reduce(value)
        value /= runtime.world_size
    return value.item()
