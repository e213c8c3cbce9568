"""The training loop shared by the four methods: ``train(config)``.

One step: set lr / weight decay / teacher momentum from the schedules, run the method's
loss under 16-bit autocast on a GPU (bf16, or fp16 with a gradient scaler where the GPU lacks
bf16), backward, the method's gradient surgery (frozen layers), gradient clipping, optimizer
step, EMA teacher update. Around it: checkpoints every N steps
(atomic), exact resume, progress bar, JSONL/TensorBoard log and kNN evaluation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

import fastssl
from fastssl.accumulate import cached_gradient_step, without_gradient
from fastssl.devices import target_of
from fastssl.train.checkpoint import all_rng_states, load_newest_readable, save_keeping_previous, set_rng_state
from fastssl.train.config import TrainConfig, validate
from fastssl.train.data import (
    SeededViews,
    ShapesDataset,
    epoch_loader,
    evaluation_transform,
    open_image_folder,
    rank_batches,
    seed_python_and_numpy,
)
from fastssl.train.knn import knn_accuracy
from fastssl.train.method import Method, build_method, collapse_statistics, micro_batch_images
from fastssl.train.models import unwrap
from fastssl.train.monitor import CollapseWatch, MetricLog, ProgressBar
from fastssl.train.optim import Schedules, apply_schedules, build_optimizer
from fastssl.train.runtime import (
    Runtime,
    deferred_gradient_sync,
    full_model_state,
    full_optimizer_state,
    gathered,
    load_full_model_state,
    load_full_optimizer_state,
    mean_over_processes,
    start_runtime,
    stop_runtime,
    wrap_student,
)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step run by this call
    knn: dict[int, float] = field(default_factory=dict)  # step -> top-1 accuracy (%)
    first_step: int = 0
    last_step: int = 0
    seconds: float = 0.0
    checkpoint: str = ""


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.method``; returns the losses and kNN accuracies of this run."""
    runtime = start_runtime(config)
    try:
        validate(config, runtime.world_size)
        with fastssl.use_backend(config.backend):  # None: each op's default for the device
            return _Trainer(config, runtime).run()
    finally:
        stop_runtime(runtime)


@dataclass
class StepPrecision:
    """The step's autocast, and for float16 its gradient scaler (None otherwise)."""

    autocast: contextlib.AbstractContextManager
    scaler: Optional[torch.amp.GradScaler] = None


def step_precision(config: TrainConfig, device: torch.device) -> StepPrecision:
    """16-bit autocast on a GPU unless --amp off: bfloat16 where the device has it, else
    float16 (T4, V100) with a gradient scaler, which float16's narrow range needs; nothing
    on the CPU."""
    if device.type != "cuda" or not config.amp:
        return StepPrecision(contextlib.nullcontext())
    if target_of(device).bf16:
        return StepPrecision(torch.autocast("cuda", dtype=torch.bfloat16))
    return StepPrecision(torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda"))


def train_step(method: Method, student: torch.nn.Module, optimizer: torch.optim.Optimizer, schedules: Schedules,
               batch, epoch: int, step: int, precision: StepPrecision) -> tuple[torch.Tensor, dict]:
    """One optimization step of ``method`` on this process's ``batch``; returns the local loss
    and the values to log (lr, weight decay, gradient norm, teacher momentum)."""
    config = method.config
    scaler = precision.scaler
    values = apply_schedules(optimizer, schedules, step, config.batch_size / 256)
    optimizer.zero_grad(set_to_none=True)
    if config.micro_batch is None or config.micro_batch >= micro_batch_images(batch):
        with precision.autocast:
            loss = method.loss(student, batch, epoch, step)
        _stop_unless_finite(loss, step)
        (loss if scaler is None else scaler.scale(loss)).backward()
    else:
        loss = _micro_batch_backward(method, student, batch, epoch, step, precision)
    method.after_backward(epoch, step)
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for clipping and the step
    if config.clip_grad > 0:
        parameters = [p for p in student.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad)
        values["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if scaler is None:
        optimizer.step()
    else:  # skipped where float16 gradients overflowed; the scale adapts
        scaler.step(optimizer)
        scaler.update()
    values["momentum"] = schedules.teacher_momentum(step)
    method.after_optimizer_step(values["momentum"])
    return loss, values


def _stop_unless_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()} at step {step}: stopping (lower --lr?)")


def _micro_batch_backward(method: Method, student: torch.nn.Module, batch, epoch: int, step: int,
                          precision: StepPrecision) -> torch.Tensor:
    """The whole batch's loss, back-propagated through the student in micro-batches of
    ``--micro-batch`` images (gradient caching, fastssl.accumulate): the teacher's outputs
    over the micro-batches, then the student's without gradient, the loss on both joined,
    and the student again per micro-batch with its slice of the loss's gradient."""
    micro_batches = method.split(batch, method.config.micro_batch)

    def join(parts):
        return method.join(parts, micro_batches)

    def encode(micro):
        with precision.autocast:
            return method.student_outputs(student, micro)

    def loss_fn(outputs):
        with precision.autocast:
            return method.loss_from(outputs, teacher_outputs, batch, epoch, step)

    with precision.autocast:
        teacher_outputs = None if method.teacher is None else without_gradient(method.teacher_outputs,
                                                                               micro_batches, join)
    scale = None if precision.scaler is None else precision.scaler.scale
    return cached_gradient_step(encode, loss_fn, micro_batches, join=join, module=unwrap(student), scale=scale,
                                no_sync=deferred_gradient_sync(student),
                                check_loss=lambda loss: _stop_unless_finite(loss, step))


def to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(item, device) for item in batch)


class _Trainer:
    def __init__(self, config: TrainConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.device = runtime.device
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)  # the same initial weights on every process (FSDP does not broadcast)
        self.method: Method = build_method(config, config.kernels).to(self.device)
        self.student = wrap_student(self.method.student, self.method.teacher, runtime)
        self.method.student = self.student
        self.optimizer = build_optimizer(config, self.method.parameter_groups())
        torch.manual_seed(config.seed + runtime.rank)  # per-process randomness from here on (stochastic depth)
        seed_python_and_numpy(config.seed + runtime.rank)
        self.train_set, self.knn_sets = self._datasets()
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.train_set)} images, fewer than --batch-size "
                             f"{config.batch_size}")
        self.schedules = Schedules(config, self.steps_per_epoch)
        self.checkpoint_path = os.path.join(config.output_dir, CHECKPOINT_NAME)
        self.log = MetricLog(config.output_dir, runtime.is_main)
        self.collapse = CollapseWatch(self.steps_per_epoch)
        self.precision = step_precision(config, self.device)

    def _datasets(self):
        config = self.config
        if config.data is not None:
            return open_image_folder(config.data), None
        train_set = ShapesDataset("train", config.train_images_per_class, config.image_size, config.seed)
        test_set = ShapesDataset("test", config.test_images_per_class, config.image_size, config.seed)
        return train_set, (train_set, test_set)

    # ---------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        config = self.config
        first_step = self._resume() if config.resume else 0
        total_steps = self.schedules.total_steps
        last_step = min(total_steps, config.max_steps) if config.max_steps is not None else total_steps
        result = TrainResult(first_step=first_step, last_step=last_step, checkpoint=self.checkpoint_path)
        if first_step == 0:
            self._evaluate(0, result)
        progress = ProgressBar(last_step, first_step, config.log_every, config.progress and self.runtime.is_main)
        views = SeededViews(self.train_set, self.method.augmentation(), config.seed)
        start, step = time.perf_counter(), first_step
        while step < last_step:
            epoch = step // self.steps_per_epoch
            batches = rank_batches(len(self.train_set), config.batch_size, self.runtime.rank,
                                   self.runtime.world_size, config.seed, epoch, step % self.steps_per_epoch)
            step_start = time.perf_counter()
            for batch in epoch_loader(views, batches, config.workers, self.method.collate):
                loss, values = self._step(to_device(batch, self.device), epoch, step)
                self._watch_collapse(epoch, values)
                result.losses.append(loss)
                speed = config.batch_size / (time.perf_counter() - step_start)
                step += 1
                self._record(step, epoch, loss, values, speed, progress)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < last_step:
                    self._save(step)
                step_start = time.perf_counter()
                if step >= last_step:
                    break
            if step % self.steps_per_epoch == 0 and config.knn_every_epochs and \
                    (step // self.steps_per_epoch) % config.knn_every_epochs == 0 and step < last_step:
                self._evaluate(step, result)
        progress.close()
        self._warn(self.collapse.finish())
        result.seconds = time.perf_counter() - start
        if step > first_step:
            self._save(step)
            self._evaluate(step, result)
        self.log.close()
        return result

    def _step(self, batch, epoch: int, step: int) -> tuple[float, dict]:
        loss, values = train_step(self.method, self.student, self.optimizer, self.schedules, batch, epoch, step,
                                  self.precision)
        return mean_over_processes(loss, self.runtime), values

    def _watch_collapse(self, epoch: int, values: dict) -> None:
        distribution = self.method.output_distribution(epoch)
        if distribution is not None:
            values.update(collapse_statistics(distribution))
            self._warn(self.collapse.update(epoch, values))

    def _warn(self, warning) -> None:
        if warning and self.runtime.is_main:
            print(f"fastssl: warning: {warning}", file=sys.stderr)
            self.log.write(dict(warning=warning))

    def _record(self, step, epoch, loss, values, speed, progress) -> None:
        progress.update(step - 1, speed, dict(epoch=epoch, loss=loss, lr=values["lr"]))
        if step % max(1, self.config.log_every) == 0 or step == 1:
            self.log.write(dict(step=step, epoch=epoch, loss=loss, images_per_second=speed, **values), step)

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, step: int, result: TrainResult) -> None:
        if not self.config.knn or self.knn_sets is None:
            if step and self.runtime.is_main and self.config.knn and self.knn_sets is None:
                print("fastssl: kNN evaluation runs on the built-in dataset only (no labeled held-out split "
                      "for --data)", file=sys.stderr)
            return
        train_set, test_set = self.knn_sets
        # Every process runs it: under FSDP the backbone's weights are sharded over all of them.
        network = self.method.teacher if self.method.teacher is not None else self.student
        with gathered(network, self.runtime):
            accuracy = knn_accuracy(self.method.evaluation_backbone(), train_set, test_set,
                                    evaluation_transform(self.config.image_size), self.device,
                                    len(train_set.classes), self.config.knn_k, self.config.knn_temperature,
                                    self.method.knn_pooling)
        result.knn[step] = accuracy
        if self.runtime.is_main:
            self.log.write(dict(step=step, epoch=step // self.steps_per_epoch, knn_top1=accuracy), step)
            print(f"fastssl: step {step}: kNN top-1 {accuracy:.2f}% (k={self.config.knn_k})", file=sys.stderr)

    # ---------------------------------------------------------------- checkpoints
    def _save(self, step: int) -> None:
        runtime = self.runtime
        for module in self.method.loss_module.modules():
            if hasattr(module, "apply_center_update"):  # a pending (asynchronous) center update: saved applied
                module.apply_center_update()
        modules = self.method.modules()
        loss_state = {key: value.cpu() if torch.is_tensor(value) else value
                      for key, value in modules.pop("loss").state_dict().items()}
        payload = dict(
            step=step,
            config=self.config.to_dict(),
            models={name: full_model_state(module, runtime) for name, module in modules.items()},
            optimizer=full_optimizer_state(self.student, self.optimizer, runtime),
            gradient_scaler=None if self.precision.scaler is None else self.precision.scaler.state_dict(),
            # Per process: the loss states (SwAV's and NeCo's queues hold local features) and RNGs.
            per_process=_gather_per_process(dict(loss=loss_state, rng=None)),
        )
        if runtime.is_main:
            save_keeping_previous(payload, self.checkpoint_path)
        if runtime.distributed:
            dist.barrier()

    def _resume(self) -> int:
        checkpoint, path, skipped = load_newest_readable(self.checkpoint_path)
        runtime = self.runtime
        for note in skipped if runtime.is_main else ():
            print(f"fastssl: skipped the damaged checkpoint {note}", file=sys.stderr)
        if checkpoint is None:
            return 0
        modules = self.method.modules()
        for name, state in checkpoint["models"].items():
            load_full_model_state(modules[name], state, runtime)
        load_full_optimizer_state(self.student, self.optimizer, checkpoint["optimizer"], runtime)
        if self.precision.scaler is not None and checkpoint.get("gradient_scaler"):
            self.precision.scaler.load_state_dict(checkpoint["gradient_scaler"])
        per_process = checkpoint["per_process"]
        if len(per_process) != runtime.world_size and runtime.is_main:
            print(f"fastssl: the checkpoint was written by {len(per_process)} processes, this run has "
                  f"{runtime.world_size}: training continues but not bit-for-bit", file=sys.stderr)
        mine = per_process[runtime.rank % len(per_process)]
        modules["loss"].load_state_dict(mine["loss"])
        set_rng_state(mine["rng"])
        if runtime.is_main:
            print(f"fastssl: resumed from {path} at step {checkpoint['step']}", file=sys.stderr)
        return int(checkpoint["step"])


def _gather_per_process(state: dict) -> list[dict]:
    """Every process's ``state`` (with its RNG states filled in), in rank order."""
    rng_states = all_rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [dict(state, rng=rng_states[0])]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return [dict(s, rng=r) for s, r in zip(states, rng_states)]
