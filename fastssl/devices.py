"""The facts of every GPU fastssl targets, and of the device an op runs on.

Launchers choose their tiles, warps and stages from these facts (shared memory per block,
warp or wavefront width, multiprocessors, bf16), never from the name of an architecture. On
a GPU the facts come from ``torch.cuda.get_device_properties`` (ROCm's torch reports AMD
GPUs there too); elsewhere ``FASTSSL_TARGET=<name>`` gives the launchers a target's facts, so
that the configurations they would choose on it can be compiled ahead of time and checked
on any machine (``tests/compile_kernels.py --target``). Under the Triton interpreter without
``FASTSSL_TARGET`` the launchers see ``DEFAULT_TARGET``.

Sources: the vendors' specifications and tuning guides (NVIDIA CUDA C++ Programming Guide,
compute capabilities table: shared memory per block with opt-in, 64K 32-bit registers per
SM, at most 255 per thread; AMD CDNA2/CDNA3 ISA guides: 64 KiB LDS per workgroup, 512 vector
registers per wavefront counting the accumulation registers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

KIB = 1024


@dataclass(frozen=True)
class Target:
    """One GPU (or one family sharing its facts)."""

    name: str
    vendor: str  # "cuda" or "hip"
    arch: str  # "sm_75", "gfx90a", ...
    shared_memory: int  # bytes per block, the opt-in maximum (LDS per workgroup on AMD)
    warp_size: int  # threads of a warp (NVIDIA) or wavefront (AMD)
    multiprocessors: int  # SMs or compute units
    bf16: bool  # bfloat16 arithmetic (tensor cores / matrix cores and conversions)
    memory_gb: float
    registers_per_thread: int  # the most a thread (NVIDIA) or lane (AMD, VGPR + AGPR) may hold
    products: str

    @property
    def capability(self) -> Optional[int]:
        """NVIDIA's compute capability as Triton spells it (75 for sm_75); None on AMD."""
        return int(self.arch[3:]) if self.vendor == "cuda" else None

    def triton_target(self):
        from triton.backends.compiler import GPUTarget

        if self.vendor == "cuda":
            return GPUTarget("cuda", self.capability, self.warp_size)
        return GPUTarget("hip", self.arch, self.warp_size)


def _nvidia(name, arch, shared_kib, multiprocessors, bf16, memory_gb, products):
    return Target(name, "cuda", arch, int(shared_kib * KIB), 32, multiprocessors, bf16, memory_gb, 255, products)


def _amd(name, arch, multiprocessors, memory_gb, products):
    return Target(name, "hip", arch, 64 * KIB, 64, multiprocessors, True, memory_gb, 512, products)


TARGETS = {target.name: target for target in [
    _nvidia("v100", "sm_70", 96, 80, False, 32, "Tesla V100 16/32 GB"),
    _nvidia("t4", "sm_75", 64, 40, False, 16, "Tesla T4 (Colab's free GPU), RTX 20xx"),
    _nvidia("a100", "sm_80", 163, 108, True, 80, "A100 40/80 GB"),
    _nvidia("rtx3090", "sm_86", 99, 82, True, 24, "RTX 3090"),
    _nvidia("a6000", "sm_86", 99, 84, True, 48, "RTX A6000"),
    _nvidia("rtx4090", "sm_89", 99, 128, True, 24, "RTX 4090"),
    _nvidia("l4", "sm_89", 99, 58, True, 24, "L4"),
    _nvidia("l40s", "sm_89", 99, 142, True, 48, "L40S"),
    _nvidia("h100", "sm_90", 227, 132, True, 80, "H100 SXM/PCIe"),
    _nvidia("h200", "sm_90", 227, 132, True, 141, "H200"),
    _nvidia("b200", "sm_100", 227, 148, True, 180, "B200"),
    _nvidia("rtx5090", "sm_120", 99, 170, True, 32, "RTX 5090"),
    _amd("mi250x", "gfx90a", 110, 64, "MI250X (per GCD; LUMI), MI210/MI250"),
    _amd("mi300x", "gfx942", 304, 192, "MI300X"),
]}
# One target per compiler architecture: what tests/compile_kernels.py --target all compiles.
ARCHITECTURES = ("v100", "t4", "a100", "rtx3090", "rtx4090", "h100", "b200", "rtx5090", "mi250x", "mi300x")
DEFAULT_TARGET = "h100"  # what the interpreter's launches are sized for without FASTSSL_TARGET


def requested_target() -> Optional[Target]:
    """The target ``FASTSSL_TARGET`` names, or None; an unknown name raises, listing the names."""
    name = os.environ.get("FASTSSL_TARGET", "").strip().lower()
    if not name:
        return None
    if name not in TARGETS:
        raise ValueError(f"FASTSSL_TARGET={name!r} is not a known target; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def _from_properties(device: torch.device) -> Target:
    properties = torch.cuda.get_device_properties(device)
    hip = torch.version.hip is not None
    arch = properties.gcnArchName.split(":")[0] if hip else f"sm_{properties.major}{properties.minor}"
    warp_size = getattr(properties, "warp_size", 64 if hip else 32)
    shared = getattr(properties, "shared_memory_per_block_optin", 0) or properties.shared_memory_per_block
    known = [target for target in TARGETS.values() if target.arch == arch]
    return Target(
        name=properties.name, vendor="hip" if hip else "cuda", arch=arch, shared_memory=shared, warp_size=warp_size,
        multiprocessors=properties.multi_processor_count,
        bf16=hip or properties.major >= 8,
        memory_gb=properties.total_memory / 1e9,
        registers_per_thread=512 if hip else 255,
        products=known[0].products if known else properties.name)


def target_of(device: torch.device) -> Target:
    """The facts the launchers size a launch on ``device`` by: the GPU's own, or under the
    interpreter those of ``FASTSSL_TARGET`` (default ``DEFAULT_TARGET``). ``FASTSSL_TARGET``
    on a machine with a GPU is for checks only and is refused for CUDA tensors: launches
    sized for another device would fail or run slowly."""
    requested = requested_target()
    if device.type == "cuda":
        if requested is not None:
            raise ValueError(f"FASTSSL_TARGET={requested.name} is set, but the tensors are on a GPU, whose own "
                             f"facts size the launches; unset it")
        return _from_properties(device)
    return requested or TARGETS[DEFAULT_TARGET]
