"""Command line: ``fastssl info``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

import fastssl


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _native_status() -> str:
    from fastssl import _native

    reason = _native.cpp_reason()
    return f"fastssl._C {_native.native().cuda_status}" if reason is None else reason


def info() -> str:
    """Versions, devices and, per device, each backend with the reason it is unavailable."""
    lines = [
        f"fastssl  {fastssl.__version__}",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {_version('triton')}",
        f"native   {_native_status()}",
        "",
        "devices:",
    ]
    devices = [torch.device("cpu")]
    lines.append(f"  cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(torch.device("cuda", index))
        lines.append(
            f"  cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
        )
    if not torch.cuda.is_available():
        lines.append("  no CUDA device")
    requested = fastssl.backend.requested_backend()
    lines += ["", f"requested backend: {requested or 'none (each op picks the fastest available)'}"]
    for device in devices:
        lines.append(f"backends on {device}:")
        for name, reason in fastssl.available_backends(device).items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl", description=fastssl.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices and available backends (with reasons)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
