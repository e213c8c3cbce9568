"""Launch configurations chosen by what the compiler says they need on the device.

A launcher lists its candidate configurations (tile sizes, warps), the fastest first, and
:func:`first_that_fits` returns the first whose binaries for the device fit its shared memory
(Triton raises OutOfResources at launch otherwise) and spill no registers (spills go to
local memory). The facts come from the binaries themselves, not from rules about
architectures: the same configuration needs 72 KiB of shared memory on sm_80 and 128 KiB on
sm_75 (no tensor cores there in Triton: its dots lower to FMA), and a kernel at 255
registers on sm_80 spills on sm_86 and on gfx942. Per device and configuration key, the
choice is made once per process; each candidate tried costs one compilation, which Triton
caches on disk.

Where the resources come from:
- a GPU: the kernel compiled for it (``JITFunction.warmup``) and loaded, which reports its
  registers and spill bytes (an OutOfResources while loading means it does not fit);
- ``FASTSSL_TARGET`` without the interpreter (tests/compile_kernels.py): the kernel compiled
  ahead of time for that target and its binary read (:func:`binary_resources`);
- the Triton interpreter: nothing is compiled, and the first candidate is used.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

from fastssl.backend import triton_interpreter_enabled
from fastssl.devices import Target, target_of

Candidate = TypeVar("Candidate")
Launch = tuple  # (kernel, args, launch keyword arguments: constexprs and options)

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                 torch.int32: "*i32", torch.int64: "*i64"}
SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)
# PTX of the NVIDIA matrix instructions, newest first.
PTX_MATRIX = (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma"))


@dataclass(frozen=True)
class Resources:
    shared: int  # bytes of shared memory (LDS on AMD)
    registers: int  # per thread (NVIDIA) or lane (AMD: VGPRs and AGPRs)
    spills: int  # NVIDIA: spill instructions (or local bytes where SASS is unreadable); AMD: spilled registers
    matrix: str = ""  # what the dots compiled to: tcgen05, wgmma, mma, mfma, fma; "" without dots


def has_data(tensor: torch.Tensor) -> bool:
    """False for fake and meta tensors, on which memory planning runs a step: launchers that
    are not custom ops (whose fakes stand in for them there) allocate as usual and launch
    nothing, so the step's allocations are counted without a device."""
    return not (tensor.is_meta or is_fake(tensor))


def signature(kernel, args, kwargs) -> tuple[dict, dict]:
    """Triton's (signature, constants) of a launch, for compiling it ahead of time."""
    values = dict(zip(kernel.arg_names, args))
    values.update({name: value for name, value in kwargs.items() if name in kernel.arg_names})
    types, constants = {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr or value is None or isinstance(value, bool):
            types[name] = "constexpr"
            constants[(index,)] = value
        elif isinstance(value, torch.Tensor):
            types[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, int):
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {name}={value!r}")
    return types, constants


def compile_for(kernel, args, kwargs, target: Target):
    """The launch compiled ahead of time for ``target`` (no GPU needed)."""
    from triton.compiler import ASTSource

    types, constants = signature(kernel, args, kwargs)
    options = {name: value for name, value in kwargs.items() if name not in kernel.arg_names}
    return triton.compile(ASTSource(kernel, types, constants), target=target.triton_target(), options=options)


def _nvidia_resources(compiled) -> Resources:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(compiled.asm["cubin"])
        file.flush()
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
        frame = int(usage.split("STACK:")[1].split()[0])
        # Spills live in the local-memory frame: without one there are none, and the SASS
        # (a third of a second to disassemble) need not be read.
        sass = subprocess.run([tools / "cuobjdump", "-sass", file.name], capture_output=True,
                              text=True) if frame else None
    if sass is None:
        spills = 0
    elif sass.returncode == 0:  # spill stores and loads in the SASS
        opcodes = [match[1] for match in SASS_INSTRUCTION.finditer(sass.stdout)]
        spills = sum(op.startswith(("STL", "LDL")) for op in opcodes)
    else:  # this toolkit no longer disassembles sm_70: the local memory frame, in bytes
        spills = frame
    ptx = compiled.asm["ptx"]
    matrix = next((name for pattern, name in PTX_MATRIX if pattern in ptx), "")
    return Resources(compiled.metadata.shared, int(usage.split("REG:")[1].split()[0]), spills,
                     matrix or ("fma" if "tt.dot" in compiled.asm["ttir"] else ""))


def _amd_resources(compiled) -> Resources:
    code = compiled.asm["amdgcn"]

    def count(key: str) -> int:
        found = re.findall(rf"\.{key}:\s+(\d+)", code)
        return int(found[0]) if found else 0

    matrix = "mfma" if re.search(r"\bv_mfma", code) else ("fma" if "tt.dot" in compiled.asm["ttir"] else "")
    return Resources(compiled.metadata.shared, count("vgpr_count") + count("agpr_count"),
                     count("vgpr_spill_count") + count("sgpr_spill_count"), matrix)


_read_binaries: dict = {}


def binary_resources(compiled, target: Target) -> Resources:
    """What a binary compiled ahead of time for ``target`` needs, read from the binary (once
    per binary and process: a chosen candidate is read again when it is compiled to launch)."""
    if compiled.hash not in _read_binaries:
        read = _nvidia_resources if target.vendor == "cuda" else _amd_resources
        _read_binaries[compiled.hash] = read(compiled)
    return _read_binaries[compiled.hash]


def _loaded_resources(kernel, args, kwargs, device: torch.device) -> Resources:
    """What the kernel needs on this GPU: compiled for it and loaded (not launched)."""
    from triton.runtime.autotuner import OutOfResources

    with torch.cuda.device(device):
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        try:
            compiled._init_handles()
        except OutOfResources:
            return Resources(compiled.metadata.shared, 0, 0)
        return Resources(compiled.metadata.shared, compiled.n_regs, compiled.n_spills)


def resources(kernel, args, kwargs, device: torch.device) -> Resources:
    target = target_of(device)
    if device.type == "cuda":
        return _loaded_resources(kernel, args, kwargs, device)
    return binary_resources(compile_for(kernel, args, kwargs, target), target)


_choices: dict = {}


def first_that_fits(key: Hashable, device: torch.device, candidates: Sequence[Candidate],
                    launches: Callable[[Candidate], Sequence[Launch]]) -> Candidate:
    """The first candidate whose launches all fit the device's shared memory and spill no
    registers; else the first that fits; else a ValueError naming each candidate's need.

    ``launches(candidate)`` gives the (kernel, args, kwargs) the candidate would launch;
    ``key`` names the choice (op, kernel, dtypes, shapes that change the code), which is
    made once per process and device. Candidates are compiled in order, and none after the
    first that fits without spilling."""
    if triton_interpreter_enabled():  # nothing is compiled: the first candidate, as on the GPUs it fits
        return candidates[0]
    target = target_of(device)
    memo = (key, target.name, target.arch, device.index if device.type == "cuda" else None)
    if memo not in _choices:
        _choices[memo] = _choose(key, device, target, candidates, launches)
    return _choices[memo]


def _choose(key, device, target: Target, candidates, launches) -> Candidate:
    needs = []
    for candidate in candidates:
        need = [resources(kernel, args, kwargs, device) for kernel, args, kwargs in launches(candidate)]
        needs.append(need)
        if all(r.shared <= target.shared_memory and r.spills == 0 for r in need):
            return candidate
    fitting = [c for c, need in zip(candidates, needs) if all(r.shared <= target.shared_memory for r in need)]
    if not fitting:
        described = "; ".join(f"{c}: {max(r.shared for r in need)} bytes" for c, need in zip(candidates, needs))
        raise ValueError(f"{key}: no launch configuration fits the {target.shared_memory} bytes of shared memory "
                         f"per block of {target.name} ({target.arch}): {described}")
    return fitting[0]
