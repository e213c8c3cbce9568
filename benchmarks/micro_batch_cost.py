"""What ``--micro-batch`` costs and saves: each method's training step (the tiny preset's
networks and batch of 32, on the CPU) on the whole batch and in micro-batches of 8, the
step's time and the peak bytes of the tensors it creates (fastssl.memory.AllocationTracker).

    python benchmarks/micro_batch_cost.py             # every method; writes results/cpu/micro_batch.*
    python benchmarks/micro_batch_cost.py --smoke     # one timing sample each, into a temporary directory
    python benchmarks/micro_batch_cost.py --readme    # only the README's table, from results/cpu/

Micro-batches run the student a second time (gradient caching, fastssl.accumulate), so the
expected extra time is one student forward: about a third of the student's forward and
backward where the teacher's forward is small, less where the loss or the teacher is a
large part of the step. The peak falls because one micro-batch's activations are held at a
time; at the tiny preset's sizes gradients and fixed costs are a large part of it, so the
saving at a recipe's sizes is larger than shown here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from fastssl.benchmark import current_commit, readme_table_from, replace_marked_section, time_ms
from fastssl.memory import peak_allocated_bytes
from fastssl.train import resolve_config
from fastssl.train.config import METHODS
from fastssl.train.data import SeededViews, ShapesDataset
from fastssl.train.loop import StepPrecision, _micro_batch_backward
from fastssl.train.method import build_method

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- micro-batch-cost:begin -->", "<!-- micro-batch-cost:end -->"
BATCH, MICRO_BATCH = 32, 8


def step_function(method, batch, micro_batch):
    """One loss and backward of (a copy of) ``method``, from no gradients."""
    run = copy.deepcopy(method)
    run.config = copy.copy(method.config)
    run.config.micro_batch = micro_batch
    precision = StepPrecision(contextlib.nullcontext())

    def step():
        run.student.zero_grad(set_to_none=True)
        if micro_batch is None:
            run.loss(run.student, batch, 0, 0).backward()
        else:
            _micro_batch_backward(run, run.student, batch, 0, 0, precision)
    return step


def measure(method_name: str, samples: int) -> dict:
    config = resolve_config(method_name, "tiny", batch_size=BATCH, workers=0, progress=False, knn=False)
    torch.manual_seed(0)
    method = build_method(config, True)
    dataset = ShapesDataset("train", config.train_images_per_class, config.image_size, config.seed)
    views = SeededViews(dataset, method.augmentation(), config.seed)
    batch = method.collate([views[(0, index)] for index in range(BATCH)])
    row = dict(method=method_name, arch=config.arch, batch=BATCH, micro_batch=MICRO_BATCH)
    for name, micro_batch in (("whole", None), ("micro", MICRO_BATCH)):
        step = step_function(method, batch, micro_batch)
        row[f"{name}_ms"] = time_ms(step, torch.device("cpu"), cpu_samples=samples)
        row[f"{name}_peak_bytes"] = peak_allocated_bytes(step)
    return row


def table(document: dict) -> str:
    lines = [f"One step (loss and backward; the tiny preset's networks, batch {BATCH}) on {document['machine']}, "
             f"whole batch against micro-batches of {MICRO_BATCH}; peak: bytes of the tensors the step creates.",
             "", "| method | network | step, whole batch | step, micro-batches | extra time | peak, whole batch | "
             "peak, micro-batches | commit |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in document["runs"]:
        lines.append(f"| {row['method']} | {row['arch']} | {row['whole_ms']:.0f} ms | {row['micro_ms']:.0f} ms | "
                     f"{row['micro_ms'] / row['whole_ms'] - 1:+.0%} | {row['whole_peak_bytes'] / 2**20:.1f} MiB | "
                     f"{row['micro_peak_bytes'] / 2**20:.1f} MiB | {row['commit']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one timing sample each, results to a temporary "
                                                             "directory")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README's table from "
                                                              "results/cpu/micro_batch.json")
    args = parser.parse_args()
    if args.readme:
        return readme_table_from(RESULTS / "micro_batch.json", BEGIN, END, table)
    commit = current_commit()
    runs = []
    for method_name in METHODS:
        runs.append(dict(measure(method_name, 1 if args.smoke else 5), commit=commit))
        print(f"{method_name}: {runs[-1]['whole_ms']:.0f} ms -> {runs[-1]['micro_ms']:.0f} ms", flush=True)
    document = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    threads=torch.get_num_threads(), runs=runs)
    out = Path(tempfile.mkdtemp(prefix="fastssl-micro-batch-smoke-")) if args.smoke else RESULTS
    (out / "micro_batch.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "micro_batch.md").write_text(f"# Micro-batches: cost and memory\n\n{table(document)}\n")
    if not args.smoke:
        replace_marked_section(README, BEGIN, END, table(document))
    print(f"wrote {out / 'micro_batch'}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
