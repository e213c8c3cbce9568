"""Optimizers (AdamW, SGD, LARS), parameter groups and the per-step schedules.

Schedules are pure functions of the global step, so a checkpoint only needs the step to
resume them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from fastssl.train.config import TrainConfig


def cosine_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base``, then a half cosine from ``base`` to ``final``."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


@dataclass
class Schedules:
    """lr, weight decay and teacher momentum at each step (DINO's recipe: warm-up then cosine)."""

    config: TrainConfig
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def lr_scale(self, step: int) -> float:
        """Multiplier of each group's peak lr."""
        config = self.config
        peak = 1.0
        final = config.min_lr / config.lr if config.lr else 0.0
        warmup = int(config.warmup_epochs * self.steps_per_epoch)
        return cosine_schedule(step, self.total_steps, peak, final, warmup)

    def weight_decay(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.config.weight_decay, self.config.weight_decay_end)

    def teacher_momentum(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.config.momentum_teacher, 1.0)


def split_decay(named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float, name: str = "") -> list[dict]:
    """Two groups: weights (decayed) and biases/norms/tokens (not decayed, nor LARS-adapted)."""
    decayed, plain = [], []
    for parameter_name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        is_plain = parameter.ndim <= 1 or parameter_name.endswith(".bias") or "token" in parameter_name
        (plain if is_plain else decayed).append(parameter)
    return [group for group in (
        dict(params=decayed, peak_lr=lr, decay=True, name=f"{name}decayed"),
        dict(params=plain, peak_lr=lr, decay=False, name=f"{name}plain"),
    ) if group["params"]]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as the
    SwAV and Barlow Twins recipes use: each decayed tensor's update is scaled by
    ``eta * ||w|| / ||g + wd * w||``; groups with ``decay=False`` get plain SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, decay=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if group["decay"]:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.norm(parameter), torch.norm(update)
                    trust = torch.where((weight_norm > 0) & (update_norm > 0),
                                        group["eta"] * weight_norm / update_norm, torch.ones_like(weight_norm))
                    update = update.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """Groups carry ``peak_lr`` (before batch scaling) and ``decay``; lr and weight decay are
    set every step by :func:`apply_schedules`."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, foreach=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True)
    return LARS(groups, lr=0.0)


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int, batch_scale: float) -> dict:
    """Set each group's lr and weight decay for ``step``; return the values for logging."""
    lr_scale, weight_decay = schedules.lr_scale(step), schedules.weight_decay(step)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * batch_scale * lr_scale
        group["weight_decay"] = weight_decay if group["decay"] else 0.0
    return dict(lr=optimizer.param_groups[0]["lr"], weight_decay=weight_decay)
