"""Command line: ``fastssl info``, ``fastssl train``, ``fastssl plan``, ``fastssl bench e2e`` and
``fastssl bench gpu-session``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import platform
import sys
import typing

import torch

import fastssl
from fastssl.devices import requested_target, target_of


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _native_status() -> str:
    from fastssl import _native

    reason = _native.cpp_reason()
    return f"fastssl._C {_native.native().cuda_status}" if reason is None else reason


def _torch_gpu_runtime() -> str:
    if torch.version.hip is not None:
        return f"ROCm/HIP {torch.version.hip}"
    return f"CUDA {torch.version.cuda or 'none'}"


def info() -> str:
    """Versions, devices and, per device, each backend with the reason it is unavailable."""
    lines = [
        f"fastssl  {fastssl.__version__}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} ({_torch_gpu_runtime()})",
        f"triton   {_version('triton')}",
        f"native   {_native_status()}",
        "",
        "devices:",
    ]
    devices = [torch.device("cpu")]
    lines.append(f"  cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        facts = target_of(device)
        devices.append(device)
        lines.append(
            f"  cuda:{index}: {facts.name}, {facts.memory_gb:.0f} GB, {facts.arch}, {facts.multiprocessors} "
            f"{'CUs' if facts.vendor == 'hip' else 'SMs'}, {facts.shared_memory // 1024} KiB shared memory per "
            f"block, {'bf16 and fp16' if facts.bf16 else 'fp16 only (no bf16)'}"
        )
    if not torch.cuda.is_available():
        lines.append("  no GPU")
    target = requested_target()
    if target is not None:
        lines.append(f"  FASTSSL_TARGET={target.name}: launches off the GPU are sized for {target.arch} "
                     f"({target.products})")
    requested = fastssl.backend.requested_backend()
    lines += ["", f"requested backend: {requested or 'none (each op picks the fastest available)'}"]
    for device in devices:
        lines.append(f"backends on {device}:")
        for name, reason in fastssl.available_backends(device).items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (``--batch-size`` for ``batch_size``); unset options
    keep the method's or the preset's value."""
    from fastssl.train.config import METHODS, PRESETS, TrainConfig

    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a small recipe, e.g. tiny: minutes on a CPU")
    hints = typing.get_type_hints(TrainConfig)
    for config_field in dataclasses.fields(TrainConfig):
        if config_field.name == "method":
            continue
        option = "--" + config_field.name.replace("_", "-")
        kind = hints[config_field.name]
        kwargs = dict(default=None, help=config_field.metadata.get("help", f"default {config_field.default!r}"))
        if kind is bool:
            kwargs.update(type=_on_off, metavar="on|off")
        elif kind is tuple:
            kwargs.update(type=float, nargs=2, metavar=("MIN", "MAX"))
        else:
            kwargs.update(type=next((t for t in typing.get_args(kind) if t is not type(None)), kind))
        parser.add_argument(option, **kwargs)


def run_train(args: argparse.Namespace) -> int:
    from fastssl.train import resolve_config, train
    from fastssl.train.checkpoint import CheckpointError

    overrides = {key: value for key, value in vars(args).items() if key not in ("command", "method", "preset")}
    try:
        config = resolve_config(args.method, args.preset, **overrides)
    except ValueError as error:
        print(f"fastssl train: error: {error}", file=sys.stderr)
        return 2
    try:
        result = train(config)
    except CheckpointError as error:  # none to resume from, or one that would run code: one line
        print(f"fastssl train: error: {error}", file=sys.stderr)
        return 2
    if result.losses:
        print(f"trained steps {result.first_step}..{result.last_step} in {result.seconds:.0f} s: "
              f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    for step, accuracy in result.knn.items():
        print(f"kNN top-1 at step {step}: {accuracy:.2f}%")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from fastssl.devices import TARGETS

    add_train_arguments(parser)
    parser.add_argument("--gpu", required=True, choices=sorted(TARGETS), help="the GPU to plan for")
    parser.add_argument("--memory-gb", type=float, help="its memory, where it comes in sizes (A100: 40 or 80)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    import json

    from fastssl.plan import PATHS, format_plan, plan
    from fastssl.train import resolve_config

    options = ("command", "method", "preset", "gpu", "memory_gb", "json")
    overrides = {key: value for key, value in vars(args).items() if key not in options}
    try:
        config = resolve_config(args.method, args.preset, **overrides)
        paths = tuple(PATHS) if args.kernels is None else (f"kernels_{'on' if args.kernels else 'off'}",)
        result = plan(config, args.gpu, args.memory_gb, paths)
    except ValueError as error:
        print(f"fastssl plan: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from fastssl.train import bench_e2e

    suites = parser.add_subparsers(dest="suite", required=True)
    summary = "the training step of each published recipe, kernels on and off, and the GPU-hours saved"
    bench_e2e.add_arguments(suites.add_parser("e2e", help=summary, description=summary))
    suites.add_parser("gpu-session", add_help=False,
                      help="the one budgeted command for a GPU window (benchmarks/gpu_session.py; "
                           "its options, --help included, follow)")


def run_gpu_session(argv: list[str]) -> int:
    """benchmarks/gpu_session.py of the repository this package is installed from (editable)."""
    import importlib.util

    from fastssl.benchmark import REPO_ROOT

    path = REPO_ROOT / "benchmarks" / "gpu_session.py"
    if not path.exists():
        raise SystemExit(f"fastssl bench gpu-session runs {path}, which this install lacks: install fastssl "
                         "from a clone of its repository (pip install -e .)")
    spec = importlib.util.spec_from_file_location("gpu_session", path)
    module = sys.modules["gpu_session"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl", description=fastssl.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices and available backends (with reasons)")
    add_train_arguments(commands.add_parser(
        "train", help="train DINO, SwAV, Barlow Twins or NeCo (torchrun for several processes)"))
    add_plan_arguments(commands.add_parser(
        "plan", help="a training step's memory and work at any size on a chosen GPU, predicted without one "
                     "(kernels off and on; the largest batch that fits)"))
    add_bench_arguments(commands.add_parser(
        "bench", help="the end-to-end benchmark, or the GPU session (every benchmark at once: "
                      "python benchmarks/run_all.py)"))
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench" and args.suite == "gpu-session":
        return run_gpu_session(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "info":
        print(info())
    elif args.command == "train":
        return run_train(args)
    elif args.command == "plan":
        return run_plan(args)
    elif args.command == "bench":
        from fastssl.train import bench_e2e

        bench_e2e.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
