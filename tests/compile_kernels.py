"""Compile every Triton kernel configuration the launchers use, for sm_80 and sm_90, on a
machine without a GPU, and report each binary's resources.

The Triton interpreter checks what the kernels compute, not that they compile for a GPU.
This script runs the real launchers on small CPU tensors with ``JITFunction.run`` replaced:
instead of launching, each call's signature is built from its arguments and compiled
ahead of time (Triton bundles ptxas) for both targets. Each binary's registers per thread,
spill stores and loads (STL / LDL instructions in its SASS), shared memory and, on sm_90,
whether its dots compiled to wgmma (HGMMA instructions) are read with Triton's bundled
cuobjdump. Run it without TRITON_INTERPRET:

    python tests/compile_kernels.py            # compile; fail if a recipe's 16-bit binary spills
    python tests/compile_kernels.py --report   # also print the table of every binary

Launches at the recipes' shapes (REFERENCE.md) are labelled with the recipe. A bf16 or fp16
binary launched by a recipe must not spill on either target: spills go to local memory,
which costs bandwidth in the kernels that run every training step. float32 binaries and the
other shapes (head_dim 32 and 128 attention, ...) are reported only.
"""

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                 torch.int32: "*i32", torch.int64: "*i64"}
SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass
class Binary:
    arch: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    wgmma: bool


@dataclass
class Configuration:
    kernel: str
    dtype: str  # the element type of its floating-point pointers: bf16, fp16 or fp32
    constants: str  # constexpr arguments and launch options
    recipes: set = field(default_factory=set)
    binaries: list = field(default_factory=list)


configurations: dict = {}
recipe_in_progress = None


@contextlib.contextmanager
def recipe(name: str):
    """Label the launches inside as the recipe ``name``'s."""
    global recipe_in_progress
    recipe_in_progress = name
    try:
        yield
    finally:
        recipe_in_progress = None


def _signature(kernel: JITFunction, args, kwargs):
    values = dict(zip(kernel.arg_names, args))
    values.update({name: value for name, value in kwargs.items() if name in kernel.arg_names})
    signature, constants = {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr or value is None or isinstance(value, bool):
            signature[name] = "constexpr"
            constants[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {name}={value!r}")
    return signature, constants


def _resources(cubin: bytes) -> tuple[int, int, int, bool]:
    """(registers, spill stores, spill loads, wgmma) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", file.name], capture_output=True, text=True, check=True).stdout
    registers = int(usage.split("REG:")[1].split()[0])
    opcodes = [match[1] for match in SASS_INSTRUCTION.finditer(sass)]
    count = lambda prefix: sum(op.startswith(prefix) for op in opcodes)  # noqa: E731
    return registers, count("STL"), count("LDL"), count("HGMMA") > 0


def compile_instead_of_launch(self, *args, grid, warmup=False, **kwargs):
    signature, constants = _signature(self, args, kwargs)
    options = {name: value for name, value in kwargs.items() if name not in self.arg_names}
    key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constants.items())), tuple(options.items()))
    if key not in configurations:
        pointers = set(signature.values())
        dtype = "bf16" if "*bf16" in pointers else "fp16" if "*fp16" in pointers else "fp32"
        named = {name: value for (index,), value in constants.items()
                 for name in [self.arg_names[index]] if value is not None}
        described = ", ".join(f"{name}={value}" for name, value in {**named, **options}.items())
        configuration = configurations[key] = Configuration(self.fn.__name__, dtype, described)
        for target in TARGETS:
            kernel = triton.compile(ASTSource(self, signature, constants), target=target, options=options)
            configuration.binaries.append(Binary(target.arch, kernel.metadata.shared,
                                                 *_resources(kernel.asm["cubin"])))
    if recipe_in_progress:
        configurations[key].recipes.add(recipe_in_progress)


def run_launchers():
    from fastssl.ops import barlow_twins, dino_loss, sinkhorn
    from fastssl.ops.dino_loss import dino_pair_weights

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, shape in [("DoRA 64x196x3", (6, 196, 3)), ("SwAV 4096x3000", (1, 4096, 3000)),
                            ("DINOv2 Sinkhorn 128x65536", (1, 128, 65536)),
                            ("Time-Tuning 25088x200", (1, 25088, 200))]:
            with recipe(name):
                sinkhorn._sinkhorn_triton(torch.zeros(shape, dtype=dtype), 0.05, 3, None)
        for name, S, T, B, K, teacher_temp in [("DINO ViT-S/16 2+10 crops K=65536", 10, 2, 4, 65536, 0.04),
                                               ("iBOT masked patches K=131072", 1, 1, 8, 131072, 0.07),
                                               ("DINOv2 ViT-L 2+8 crops K=131072", 8, 2, 2, 131072, 0.07),
                                               (None, 1, 1, 8, 1000, None)]:
            student, teacher = torch.zeros(S * B, K, dtype=dtype), torch.zeros(T * B, K, dtype=dtype)
            center = torch.zeros(K) if teacher_temp else None
            pairs, weights = dino_pair_weights(T, S) if S > 1 else torch.ones(1, 1), torch.ones(B)
            with recipe(name) if name else contextlib.nullcontext():
                dino_loss._forward_partials(student, teacher, center, S, T, 0.1, teacher_temp)
                stats_s, stats_t = torch.zeros(B, S, 2), torch.zeros(B, T, 3)
                dino_loss._dino_backward_triton(torch.ones(()), student, teacher, center, stats_s, stats_t,
                                                pairs, weights, S, T, 0.1, teacher_temp)
        N, D = 2048, 8192
        z, stats, ones = torch.zeros(N, D, dtype=dtype), torch.zeros(D), torch.ones(1)
        zn = torch.zeros(N, D)
        with recipe("Barlow Twins / VICReg N=2048 D=8192"):
            barlow_twins.standardize_pair(z, z, stats, stats, stats, stats)
            for rstd in (stats, None):  # Barlow Twins' standardization, VICReg's centering
                barlow_twins.standardize_backward(zn, zn, zn, stats, rstd, 1e-3, N, ones, 2, None, dtype)
            for symmetric in (True, False):
                barlow_twins.gram_pair(z, z, z, z, symmetric=symmetric)
                barlow_twins.gram_pair(z, z, symmetric=symmetric)
        for reduce in (True, False):  # the N >= D form
            barlow_twins.cross_correlation(torch.zeros(1024, 512, dtype=dtype), torch.zeros(1024, 512, dtype=dtype),
                                           1e-3, reduce)

    varlen_attention = importlib.import_module("fastssl.ops.varlen_attention")  # fastssl.ops exports the function
    cu_seqlens = torch.tensor([0, 37, 234, 1604], dtype=torch.int32)  # one sequence per length class
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in varlen_attention.SUPPORTED_HEAD_DIMS if dtype == torch.bfloat16 else (64,):
            q, k, v = torch.zeros(1604, 3, 6, head_dim, dtype=dtype).unbind(1)
            with recipe("DINO / DINOv2 / NeCo ViT attention") if head_dim == 64 else contextlib.nullcontext():
                out, lse = varlen_attention._forward_triton(q, k, v, cu_seqlens, 0, 0.125)
                for deterministic in (False, True):
                    varlen_attention._backward_triton(out, q, k, v, out, lse, cu_seqlens, 0, 0.125, deterministic)

    info_nce = importlib.import_module("fastssl.ops.info_nce")  # fastssl.ops exports the function
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (128, 256):  # SimCLR's and MoCo v3's projections
            rows, ones = torch.zeros(64, D, dtype=dtype), torch.ones(())
            with recipe("SimCLR 2N=8192 / MoCo v3 N=4096"):
                for own_view in (None, rows):  # MoCo v3, NT-Xent
                    lse, _ = info_nce._forward_triton(rows, rows, own_view, 0.1, 0)
                    info_nce._backward_triton(ones, rows, rows, own_view, lse, 0.1, 0, True, own_view is not None)

    soft_sort = importlib.import_module("fastssl.ops.soft_sort")  # fastssl.ops exports the functions
    neco_loss = importlib.import_module("fastssl.ops.neco_loss")
    # The network is a runtime table: only dtype, padded size and distribution make variants.
    configs = [(torch.float32, 49, d) for d in soft_sort.DISTRIBUTIONS] + [
        (torch.bfloat16, 49, "cauchy"), (torch.float16, 49, "cauchy"), (torch.float32, 2, "cauchy"),
        (torch.float32, 256, "cauchy")]
    for dtype, n, distribution in configs:
        x = torch.zeros(3, n, dtype=dtype)
        with recipe("NeCo 3136x49") if n == 49 and distribution == "cauchy" else contextlib.nullcontext():
            soft_sort._soft_sort_forward_triton(x, 10.0, "bitonic", distribution, 0.25)
            soft_sort.soft_sort_backward_triton(x, x, torch.zeros(3, n, n, dtype=dtype), 10.0, "bitonic",
                                                distribution, 0.25)
            if n == 49 and distribution == "cauchy" and dtype != torch.float16:
                neco_loss._neco_rows_triton(x, x, 100.0, 100.0, "bitonic", distribution, 0.25)
                soft_sort.soft_sort_backward_triton(x, None, None, 100.0, "bitonic", distribution, 0.25, teacher=x,
                                                    grad_rows=torch.ones(3), teacher_steepness=100.0)


def _cells(binary: Binary) -> str:
    wgmma = (" yes" if binary.wgmma else " no") if binary.arch >= 90 else ""
    return (f"{binary.registers} | {binary.spill_stores}/{binary.spill_loads} | {binary.shared // 1024} KiB"
            + (f" |{wgmma}" if binary.arch >= 90 else ""))


def report() -> str:
    lines = ["| kernel | dtype | configuration | recipe | sm_80 registers | spills (st/ld) | shared "
             "| sm_90 registers | spills (st/ld) | shared | wgmma |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for configuration in sorted(configurations.values(), key=lambda c: (c.kernel, c.dtype, c.constants)):
        recipes = "; ".join(sorted(configuration.recipes)) or "-"
        lines.append(f"| `{configuration.kernel}` | {configuration.dtype} | {configuration.constants} | {recipes} | "
                     + " | ".join(_cells(binary) for binary in configuration.binaries) + " |")
    return "\n".join(lines)


def gated_spills() -> list[str]:
    """The recipes' 16-bit binaries that spill."""
    return [f"{c.kernel} {c.dtype} sm_{b.arch} ({c.constants}): {b.spill_stores} spill stores, "
            f"{b.spill_loads} spill loads, {b.registers} registers; recipes: {'; '.join(sorted(c.recipes))}"
            for c in configurations.values() if c.recipes and c.dtype != "fp32"
            for b in c.binaries if b.spill_stores or b.spill_loads]


def summary() -> str:
    """Per kernel and dtype: configurations, the largest register count and spill counts per
    target, and whether every sm_90 binary uses wgmma; recipes' 16-bit rows are gated."""
    groups = {}
    for c in configurations.values():
        groups.setdefault((c.kernel, c.dtype, bool(c.recipes) and c.dtype != "fp32"), []).append(c)
    lines = ["| kernel | dtype | gated | configurations | sm_80 max registers | sm_80 spills (st/ld) "
             "| sm_90 max registers | sm_90 spills (st/ld) | sm_90 wgmma |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for (kernel, dtype, gated), group in sorted(groups.items()):
        cells = []
        for arch in (80, 90):
            binaries = [b for c in group for b in c.binaries if b.arch == arch]
            cells += [str(max(b.registers for b in binaries)),
                      f"{sum(b.spill_stores for b in binaries)}/{sum(b.spill_loads for b in binaries)}"]
        dots = [b.wgmma for c in group for b in c.binaries if b.arch == 90]
        wgmma = "all" if all(dots) else "none" if not any(dots) else f"{sum(dots)} of {len(dots)}"
        lines.append(f"| `{kernel}` | {dtype} | {'yes' if gated else 'no'} | {len(group)} | {' | '.join(cells)} "
                     f"| {wgmma} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print every binary's resources (markdown)")
    parser.add_argument("--readme", action="store_true", help="write the per-kernel summary into README.md")
    args = parser.parse_args()
    JITFunction.run = compile_instead_of_launch
    run_launchers()
    binaries = [binary for configuration in configurations.values() for binary in configuration.binaries]
    kernels = sorted({configuration.kernel for configuration in configurations.values()})
    print(f"compiled {len(binaries)} kernel binaries ({len(configurations)} configurations of "
          f"{len(kernels)} kernels) for sm_80 and sm_90: {', '.join(kernels)}")
    print(f"largest shared memory: {max(binary.shared for binary in binaries)} bytes")
    if args.report:
        print(report())
    if args.readme:
        from fastssl.benchmark import replace_marked_section

        readme = Path(__file__).resolve().parent.parent / "README.md"
        replace_marked_section(readme, "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->", summary())
    spills = gated_spills()
    for line in spills:
        print(f"SPILLS: {line}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
