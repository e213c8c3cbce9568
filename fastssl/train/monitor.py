"""Progress bar (img/s, ETA), JSONL log, optional TensorBoard, and the collapse watch."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """One line redrawn in place on a terminal; one line every ``log_every`` steps otherwise."""

    def __init__(self, total_steps: int, first_step: int, log_every: int, enabled: bool, stream=sys.stderr):
        self.total_steps, self.first_step, self.log_every = total_steps, first_step, max(1, log_every)
        self.enabled, self.stream = enabled, stream
        self.interactive = enabled and stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, images_per_second: float, fields: dict) -> None:
        if not self.enabled:
            return
        done = step + 1
        if not self.interactive and done % self.log_every and done != self.total_steps:
            return
        elapsed = time.perf_counter() - self.start
        rate = (done - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * done / self.total_steps)
        text = " ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in fields.items())
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total_steps} {text} "
                f"{images_per_second:.1f} img/s ETA {format_duration(eta)}")
        self.stream.write(("\r" + line + "\033[K") if self.interactive else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


class MetricLog:
    """Appends one JSON object per record to ``output_dir/log.jsonl``, and writes scalars to
    TensorBoard when the tensorboard package is installed (it is optional)."""

    def __init__(self, output_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "log.jsonl")
        self.tensorboard = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("fastssl: TensorBoard logging is off (the tensorboard package is not installed: "
                  "pip install tensorboard); metrics go to " + self.path, file=sys.stderr)
        else:
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict, step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class CollapseWatch:
    """Says when the method's target distributions looked collapsed at every step of a whole
    epoch: uniform (``output_entropy`` above UNIFORM of log K: every target says nothing) or
    all on one entry (``batch_entropy`` below ONE_ENTRY of log K: every image gets the same
    target). Either way the loss can keep falling while the features learn nothing, and the
    kNN accuracy shows it only at the next evaluation."""

    UNIFORM, ONE_ENTRY = 0.95, 0.05

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.epoch: Optional[int] = None
        self.steps = self.uniform = self.one_entry = 0

    def update(self, epoch: int, statistics: dict) -> Optional[str]:
        """Record one step's statistics; returns a warning when a collapsed epoch ends."""
        warning = self.finish() if epoch != self.epoch else None
        if epoch != self.epoch:
            self.epoch, self.steps, self.uniform, self.one_entry = epoch, 0, 0, 0
        self.steps += 1
        self.uniform += statistics["output_entropy"] > self.UNIFORM
        self.one_entry += statistics["batch_entropy"] < self.ONE_ENTRY
        return warning

    def finish(self) -> Optional[str]:
        """The warning for the epoch in progress, if it is complete and was collapsed."""
        if self.epoch is None or self.steps < self.steps_per_epoch:
            return None
        if self.uniform == self.steps:
            return (f"epoch {self.epoch}: the targets were uniform at every step (output entropy above "
                    f"{self.UNIFORM:.0%} of log K): the run has collapsed (try a sharper teacher or a lower lr)")
        if self.one_entry == self.steps:
            return (f"epoch {self.epoch}: every image got the same target at every step (batch entropy below "
                    f"{self.ONE_ENTRY:.0%} of log K): the run has collapsed (try more centering or a lower lr)")
        return None
