"""End-to-end benchmark: the training step of each published recipe with fastssl's kernels and
with the original ops, and the GPU-hours the difference saves.

``fastssl bench e2e --recipe NAME|all`` (or ``python benchmarks/bench_e2e.py``). Per recipe,
in one process:

- The trainer's method (:func:`fastssl.train.method.build_method`) at the recipe's published
  per-GPU shapes is built twice from the same seed: kernels off (the reference path: one ViT
  forward per resolution with SDPA, the losses as the original code writes them, dense
  sorting networks for NeCo) and kernels on (fastssl's modules and the packed ViT forward).
- Both train on one batch: random images through the method's own augmentation and
  collate, made once before timing. Data loading and augmentation are in no number.
- A step is the trainer's own (:func:`fastssl.train.loop.train_step`: schedules, bf16
  autocast on CUDA, backward, gradient surgery and clipping, optimizer, EMA teacher) at a
  steady-state step: the last epoch, after every warm-up and layer freeze.
- Step time: the median of ``--steps`` steps after ``--warmup`` steps, each timed between
  two device synchronizations (wall clock on the CPU). Peak memory:
  ``torch.cuda.max_memory_allocated`` over the timed steps, weights, optimizer state and
  batch included (none on the CPU).
- Breakdown: a few more steps under ``torch.profiler``; the device time of attention, loss
  and sorting per step (:mod:`fastssl.profiling`), and the rest: the median step minus those.

The step is one process's on one GPU: in a multi-GPU run each GPU also exchanges the
gradients (and DINO's center, SwAV's Sinkhorn sums, Barlow Twins' cross-correlation or
embeddings), which neither path here does.

GPU-hours, for the published schedules of REFERENCE.md section 7, two ways:

- from the step time: ``steps * GPUs * step time / 3600`` per path, with ``steps = epochs *
  (images // global batch)`` (ImageNet-1k: 1,281,167 images; COCO train2017: 118,287); the
  saving is the difference. These are hours of the GPU that measured, not of the GPUs the
  published run used. It needs the whole schedule: where REFERENCE.md lacks a figure
  (DINOv2's GPU count and global batch) it is not computed, and SwAV's, given per epoch, is
  one epoch.
- the published GPU-hours scaled by the measured ratio ``fastssl / reference`` step time.
  That assumes the whole published step (data loading and communication included) speeds
  up as the measured step does, on the published run's GPUs as on this one, so its saving
  is an upper bound.

``--smoke`` shrinks every recipe (16-px crops, a 2-block ViT-Tiny/8 or a ResNet-18, small
heads) and runs it on the CPU, where the trainers run fastssl's reference backend; its
numbers mean nothing and go to a temporary directory unless ``--out`` is given. Real runs
write ``benchmarks/results/<gpu>/e2e.json``, ``e2e.md`` and ``e2e.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import fastssl
from fastssl.benchmark import add_harness_arguments, benchmark_device, metadata, plot, results_dir
from fastssl.profiling import COMPONENTS, component_times_us
from fastssl.train.config import TrainConfig, resolve_config

IMAGENET_1K_IMAGES = 1_281_167
COCO_TRAIN2017_IMAGES = 118_287
NOMINAL_STEPS_PER_EPOCH = 1000  # sets the schedules' values only, not the work of a step


@dataclass(frozen=True)
class Schedule:
    """A published training schedule (REFERENCE.md section 7); None where it gives no figure."""

    description: str
    published_gpu_hours: float
    gpus: Optional[int] = None
    global_batch: Optional[int] = None
    epochs: Optional[int] = None
    images: Optional[int] = None
    note: str = ""

    @property
    def steps(self) -> Optional[int]:
        if None in (self.gpus, self.global_batch, self.epochs, self.images):
            return None
        return self.epochs * (self.images // self.global_batch)


@dataclass(frozen=True)
class Recipe:
    method: str
    title: str
    settings: dict  # TrainConfig fields: the recipe's per-GPU shapes
    # The step speed-up to reach: half the gain that the step's composition allows, i.e. 1 +
    # (bound - 1) / 2, where the bound is the speed-up if attention and the losses cost nothing
    # (fastssl plan's model, benchmarks/results/model/plan.md; tests/test_plan.py checks it).
    goal: float
    schedule: Schedule
    note: str = ""


RECIPES = {
    "dino-vits16": Recipe(
        "dino", "DINO ViT-S/16, 64 x (2x224 + 8x96), K=65536",
        dict(arch="vit_small_patch16", global_crop_size=224, local_crop_size=96, local_crops=8, out_dim=65536,
             batch_size=64),
        1.12, Schedule("100 epochs of ImageNet-1k on 8 GPUs x 64", 336, gpus=8, global_batch=512, epochs=100,
                      images=IMAGENET_1K_IMAGES, note="published: about 0.62 s per step")),
    "dinov2-vitl14": Recipe(
        "dinov2", "DINOv2 ViT-L/14, 32 x (2x224 + 8x98), K=131072, DINO + iBOT + KoLeo",
        dict(arch="vit_large_patch14", depth=24, global_crop_size=224, local_crop_size=98, local_crops=8,
             out_dim=131072, batch_size=32),
        1.09, Schedule("500 epochs of ImageNet-22k", 7600, epochs=500,
                      note="REFERENCE.md gives neither the GPU count nor the global batch")),
    "neco-vits14": Recipe(
        "neco", "NeCo ViT-S/14, 64 x (2x518 + 4x98), sorts of 49",
        dict(arch="vit_small_patch14", global_crop_size=518, local_crop_size=98, local_crops=4, batch_size=64),
        1.81, Schedule("25 epochs of COCO train2017 on 1 GPU x 64", 19, gpus=1, global_batch=64, epochs=25,
                      images=COCO_TRAIN2017_IMAGES)),
    "swav-rn50": Recipe(
        "swav", "SwAV ResNet-50, 64 x (2x224 + 6x96), 3000 prototypes, no queue",
        dict(arch="resnet50", global_crop_size=224, local_crop_size=96, local_crops=6, out_dim=3000, batch_size=64,
             swav_queue_length=0),
        1.01, Schedule("1 epoch of ImageNet-1k on 64 GPUs x 64", 64 * 220 / 3600, gpus=64, global_batch=4096,
                      epochs=1, images=IMAGENET_1K_IMAGES,
                      note="published: 3 min 40 s per epoch; REFERENCE.md gives no epoch count, so per epoch")),
    "barlow-rn50": Recipe(
        "barlow", "Barlow Twins ResNet-50, 128 x 2x224, projector 8192-8192-8192",
        dict(arch="resnet50", global_crop_size=224, out_dim=8192, head_hidden_dim=8192, batch_size=128),
        1.02, Schedule("1000 epochs of ImageNet-1k on 16 GPUs x 128", 2700, gpus=16, global_batch=2048, epochs=1000,
                      images=IMAGENET_1K_IMAGES)),
}

# --smoke: every recipe shrunk to seconds on a CPU (one thread: a shared CI machine's cores
# are often busy, and then OpenMP threads wait on each other for most of a step).
SMOKE_SETTINGS = dict(global_crop_size=16, local_crop_size=8, batch_size=4, depth=2, out_dim=64, head_hidden_dim=32,
                      head_bottleneck_dim=16, neco_aligned_side=3, neco_queue_size=64, threads=1)

ASSUMPTIONS = [
    "one process on one GPU: no gradient all-reduce or other communication",
    "random images, augmented once before timing: no data loading or augmentation in the step time",
    "GPU-hours from the step time = steps x GPUs x per-GPU step time, steps = epochs x (images // global batch), "
    "in hours of the GPU that measured",
    "published GPU-hours x step-time ratio assumes the whole published step speeds up as measured (an upper bound "
    "on the saving)",
]


@dataclass(frozen=True)
class Counts:
    warmup: int
    steps: int
    profiled: int


def recipe_config(recipe: Recipe, smoke: bool) -> TrainConfig:
    settings = dict(recipe.settings)
    if smoke:
        small_arch = "vit_tiny_patch8" if recipe.settings["arch"].startswith("vit_") else "resnet18"
        settings.update(SMOKE_SETTINGS, arch=small_arch, local_crops=min(settings.get("local_crops", 0), 2))
    return resolve_config(recipe.method, **settings)


# ---------------------------------------------------------------------------- measuring


def sample_batch(method, config: TrainConfig, device: torch.device):
    """One batch of random images through the method's own augmentation and collate."""
    from fastssl.train.loop import to_device

    augment = method.augmentation()
    side = config.global_crop_size
    images = torch.randint(0, 256, (config.batch_size, 3, side, side), dtype=torch.uint8)
    return to_device(method.collate([augment(image) for image in images]), device)


def steady_state_step(method, batch, device: torch.device) -> Callable[[], None]:
    """The trainer's step on ``batch`` at the last epoch, with its optimizer and schedules."""
    from fastssl.train.loop import step_precision, train_step
    from fastssl.train.optim import Schedules, build_optimizer

    config = method.config
    optimizer = build_optimizer(config, method.parameter_groups())
    schedules = Schedules(config, NOMINAL_STEPS_PER_EPOCH)
    epoch = config.epochs - 1
    precision = step_precision(config, device)

    def step():
        train_step(method, method.student, optimizer, schedules, batch, epoch, epoch * NOMINAL_STEPS_PER_EPOCH,
                   precision)
    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_seconds(step: Callable[[], None], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def breakdown_ms(step: Callable[[], None], device: torch.device, profiled_steps: int, step_ms: float) -> dict:
    """Milliseconds per step of each component of :mod:`fastssl.profiling`, and the rest."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(profiled_steps):
            step()
        _synchronize(device)
    times_us = component_times_us(profiler.events(), device_time=device.type == "cuda")
    components = {name: times_us[name] / 1e3 / profiled_steps for name in COMPONENTS}
    return {**components, "rest": max(0.0, step_ms - sum(components.values()))}


def build_on(config: TrainConfig, kernels: bool, device: torch.device):
    """The method, from the config's seed: the same initial weights with kernels on and off."""
    from fastssl.train.method import build_method

    gc.collect()  # the other path's networks and optimizer state, before allocating these
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(config.seed)
    return build_method(config, kernels).to(device)


def measure_path(method, batch, device: torch.device, counts: Counts) -> dict:
    """Step time, peak memory and breakdown of one path (the method's kernels on or off)."""
    step = steady_state_step(method, batch, device)
    for _ in range(counts.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples_ms = [1e3 * _timed_seconds(step, device) for _ in range(counts.steps)]
    step_ms = statistics.median(samples_ms)
    return {
        "step_ms": step_ms,
        "step_ms_samples": samples_ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "breakdown_ms": breakdown_ms(step, device, counts.profiled, step_ms),
    }


def gpu_hours(schedule: Schedule, reference_ms: float, fastssl_ms: float) -> dict:
    """GPU-hours of the schedule on each path, both ways (see the module docstring)."""
    from_step_time = None
    if schedule.steps is not None:
        reference, fast = (schedule.steps * schedule.gpus * ms / 1e3 / 3600 for ms in (reference_ms, fastssl_ms))
        from_step_time = {"reference": reference, "fastssl": fast, "saved": reference - fast}
    published = schedule.published_gpu_hours
    scaled = published * fastssl_ms / reference_ms
    return {
        "steps": schedule.steps,
        "from_step_time": from_step_time,
        "published_scaled": {"reference": published, "fastssl": scaled, "saved": published - scaled},
    }


def run_recipe(name: str, device: torch.device, smoke: bool, counts: Counts) -> dict:
    recipe = RECIPES[name]
    config = recipe_config(recipe, smoke)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    paths, batch = {}, None
    with fastssl.use_backend(config.backend):
        for path, kernels in (("reference", False), ("fastssl", True)):
            method = build_on(config, kernels, device)
            batch = sample_batch(method, config, device) if batch is None else batch
            paths[path] = measure_path(method, batch, device, counts)
            del method
    reference, fast = paths["reference"], paths["fastssl"]
    speedup = reference["step_ms"] / fast["step_ms"]
    return {
        "recipe": name, "method": recipe.method, "title": recipe.title, "note": recipe.note,
        "config": config.to_dict(), "reference": reference, "fastssl": fast,
        "speedup": speedup, "goal": recipe.goal, "goal_met": speedup >= recipe.goal,
        "schedule": {**dataclasses.asdict(recipe.schedule), "steps": recipe.schedule.steps},
        "gpu_hours": gpu_hours(recipe.schedule, reference["step_ms"], fast["step_ms"]),
    }


# ---------------------------------------------------------------------------- reporting


def _memory(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def _hours(hours: Optional[dict]) -> str:
    if hours is None:
        return "-"
    return " / ".join(f"{hours[key]:,.1f}" for key in ("reference", "fastssl", "saved"))


def markdown_table(meta: dict, document: dict) -> str:
    smoke = ("CPU smoke run at tiny sizes: these numbers mean nothing; GPU numbers are still to be taken."
             if document["smoke"] else "")
    lines = [
        f"# e2e training step on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}. {smoke}".rstrip(),
        f"Per-GPU training step, one process, random images (no data loading): median of {document['steps']} "
        f"steps after {document['warmup']}. GPU-hours as reference / fastssl / saved: from the step time "
        "(steps x GPUs x step time) and as the published figure x the step-time ratio (an upper bound on the "
        "saving).",
        "",
        "| recipe | reference ms | fastssl ms | speed-up | goal | met | peak memory reference / fastssl | schedule "
        "| GPU-h from step time | published GPU-h x ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in document["recipes"]:
        reference, fast, hours = result["reference"], result["fastssl"], result["gpu_hours"]
        lines.append(
            f"| {result['recipe']} | {reference['step_ms']:.1f} | {fast['step_ms']:.1f} | {result['speedup']:.2f}x "
            f"| {result['goal']:.2f}x | {'yes' if result['goal_met'] else 'no'} "
            f"| {_memory(reference['peak_memory_bytes'])} / {_memory(fast['peak_memory_bytes'])} "
            f"| {result['schedule']['description']} | {_hours(hours['from_step_time'])} "
            f"| {_hours(hours['published_scaled'])} |")
    lines += ["", "Where the time goes, ms per step (rest: the step time minus the others):", "",
              "| recipe | path | attention | loss | sorting | rest |", "|---|---|---|---|---|---|"]
    for result in document["recipes"]:
        for path in ("reference", "fastssl"):
            parts = result[path]["breakdown_ms"]
            lines.append(f"| {result['recipe']} | {path} | "
                         + " | ".join(f"{parts[name]:.1f}" for name in (*COMPONENTS, "rest")) + " |")
    lines += ["", "Recipes:", ""]
    for result in document["recipes"]:
        notes = "; ".join(filter(None, [result["note"], result["schedule"]["note"]]))
        lines.append(f"- {result['recipe']}: {result['title']}" + (f" ({notes})" if notes else "") + ".")
    return "\n".join(lines) + "\n"


def write_results(document: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "e2e.md").write_text(markdown_table(meta, document))
    plot("e2e training step: fastssl against the reference", plot_cases(document["recipes"]), out / "e2e.png")


def plot_cases(recipes: list[dict]) -> list[dict]:
    """Each recipe's measured step in fastssl.benchmark.plot's form: the fastssl step first,
    against the reference step, with the recipe's goal."""
    def row(result, path):
        return {"contender": f"{path} step", "median_ms": result[path]["step_ms"],
                "peak_memory_bytes": result[path]["peak_memory_bytes"]}
    return [{"case": f"e2e {result['recipe']}", "results": [row(result, "fastssl"), row(result, "reference")],
             "goals": [{"kind": "speed", "against": "reference step", "target": result["goal"]}]}
            for result in recipes]


# ---------------------------------------------------------------------------- command line


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all", help="a recipe, or all (default)")
    add_harness_arguments(
        parser,
        cpu_help="accepted as the op scripts take it (benchmarks/run_all.py --cpu): skips this suite, "
                 "since the trainers run fastssl's reference ops on the CPU",
        no_compile_help="accepted as every benchmark script does (benchmarks/run_all.py); nothing is compiled")
    parser.add_argument("--steps", type=_integer_at_least(1), default=None,
                        help="timed steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=_integer_at_least(0), default=None,
                        help="steps before timing (default 5; smoke 1)")


def run(args: argparse.Namespace) -> Optional[Path]:
    """Run the recipes ``args`` selects; write e2e.json, e2e.md and e2e.png; return their
    folder (None when skipped)."""
    if args.cpu and not args.smoke:
        print("e2e: skipped with --cpu (the trainers run fastssl's reference ops on the CPU); use --smoke")
        return None
    device = benchmark_device(args)
    meta = metadata(device)
    counts = Counts(warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 5),
                    steps=args.steps or (2 if args.smoke else 20), profiled=1 if args.smoke else 3)
    names = list(RECIPES) if args.recipe == "all" else [args.recipe]
    results = []
    for name in names:
        results.append(run_recipe(name, device, args.smoke, counts))
        print(f"{name}: reference {results[-1]['reference']['step_ms']:.1f} ms, fastssl "
              f"{results[-1]['fastssl']['step_ms']:.1f} ms, {results[-1]['speedup']:.2f}x", flush=True)
    document = {"benchmark": "e2e", **meta, "smoke": args.smoke, "warmup": counts.warmup, "steps": counts.steps,
                "profiled_steps": counts.profiled, "assumptions": ASSUMPTIONS, "recipes": results}
    out = results_dir(args, meta)
    write_results(document, meta, out)
    print(f"wrote {out / 'e2e'}.json/.md/.png")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
