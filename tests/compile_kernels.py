"""Compile every Triton kernel configuration the launchers choose, for every target GPU, on
a machine without a GPU, and check what each binary needs against what the GPU has.

The Triton interpreter checks what the kernels compute, not that they build for a GPU or fit
one. This script runs the real launchers on small CPU tensors with ``JITFunction.run``
replaced: instead of launching, each call's signature is built from its arguments and
compiled ahead of time (Triton bundles ptxas and the AMD toolchain) for the target. A
process per target runs the launchers with ``FASTSSL_TARGET`` naming it, so each chooses the
configurations it would choose on that GPU (fastssl/devices.py). Per binary: shared memory
(LDS on AMD), registers, spills (NVIDIA: STL/LDL instructions in the SASS, read with Triton's
cuobjdump where the binary has a local-memory frame; AMD: the VGPR/SGPR spill counts of the
code object's metadata) and the matrix instructions its dots compiled to (FMA, mma.sync,
wgmma, tcgen05, MFMA). Run it without TRITON_INTERPRET:

    python tests/compile_kernels.py                       # every target of fastssl.devices.ARCHITECTURES
    python tests/compile_kernels.py --target t4 mi250x    # some targets
    python tests/compile_kernels.py --report              # also every binary's resources (markdown)
    python tests/compile_kernels.py --readme              # write the README's per-target tables
    python tests/compile_kernels.py --check-readme        # and fail if the README's are not these

It fails if a binary needs more shared memory than its target has (it would raise
OutOfResources at its first launch), if a configuration does not compile, or if a 16-bit
binary launched at a recipe's shape ("gated") spills registers: spills go to local memory,
which costs bandwidth in the kernels that run every training step. Gated are fp16 everywhere
and bf16 where the GPU has it (T4 and V100 have not: the trainers train in fp16 there).
float32 binaries, bf16 on those two and the other shapes are reported only.

The CUDA C++ kernels (kernels/*.cu) are compiled for each NVIDIA target with nvcc, with the
options CMakeLists.txt builds fastssl._C with, and ptxas's report per kernel; any spilled
byte fails. A target the nvcc on the PATH cannot build (nvcc 13 dropped sm_70) is reported.
"""

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastssl.devices import ARCHITECTURES, TARGETS  # noqa: E402
from fastssl.ops.launch import binary_resources, compile_for, signature  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README_BEGIN, README_END = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"


@dataclass
class Configuration:
    kernel: str
    dtype: str  # the element type of its floating-point pointers: bf16, fp16 or fp32
    constants: str  # constexpr arguments and launch options
    recipes: set = field(default_factory=set)
    binary: dict = None  # fastssl.ops.launch.Resources as a dict
    error: str = ""


configurations: dict = {}
recipe_in_progress = None
target_in_progress = None


@contextlib.contextmanager
def recipe(name: str):
    """Label the launches inside as the recipe ``name``'s."""
    global recipe_in_progress
    recipe_in_progress = name
    try:
        yield
    finally:
        recipe_in_progress = None


def compile_instead_of_launch(self, *args, grid, warmup=False, **kwargs):
    types, constants = signature(self, args, kwargs)
    options = {name: value for name, value in kwargs.items() if name not in self.arg_names}
    key = (self.fn.__name__, tuple(types.items()), tuple(sorted(constants.items())), tuple(options.items()))
    if key not in configurations:
        pointers = set(types.values())
        dtype = "bf16" if "*bf16" in pointers else "fp16" if "*fp16" in pointers else "fp32"
        named = {name: value for (index,), value in constants.items()
                 for name in [self.arg_names[index]] if value is not None}
        described = ", ".join(f"{name}={value}" for name, value in {**named, **options}.items())
        configuration = configurations[key] = Configuration(self.fn.__name__, dtype, described)
        try:
            compiled = compile_for(self, args, kwargs, target_in_progress)
            configuration.binary = asdict(binary_resources(compiled, target_in_progress))
        except Exception as error:  # reported with the configuration
            configuration.error = (str(error).strip().splitlines() or [repr(error)])[-1][:300]
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


def compile_target(name: str) -> list[dict]:
    """Every configuration the launchers choose on target ``name``, compiled for it (in a
    process of its own: FASTSSL_TARGET is read by the launchers)."""
    global target_in_progress
    os.environ["FASTSSL_TARGET"] = name
    target_in_progress = TARGETS[name]
    JITFunction.run = compile_instead_of_launch
    configurations.clear()
    run_launchers()
    return [dict(asdict(c), recipes=sorted(c.recipes)) for c in configurations.values()]


GPU_PROPERTIES = {  # as torch.cuda.get_device_properties reports them (and torch.version.hip)
    "t4": (dict(name="Tesla T4", major=7, minor=5, warp_size=32, shared_memory_per_block_optin=64 * 1024,
                gcnArchName=""), None),
    "mi300x": (dict(name="AMD Instinct MI300X", major=9, minor=4, warp_size=64,
                    shared_memory_per_block_optin=64 * 1024, gcnArchName="gfx942:sramecc+:xnack-"), "6.2"),
}


def attention_launches_on_a_gpu(name: str) -> tuple[dict, list[dict]]:
    """The facts fastssl reads off a GPU reporting ``GPU_PROPERTIES[name]``, and the attention
    backward's launches there (fp16, one sequence per length class), each with what its
    binary for that GPU needs. Tensors are fake CUDA tensors; loading a candidate (what the
    driver would report) is replaced by compiling it ahead of time for the facts read."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastssl.devices import target_of
    from fastssl.ops import launch

    properties, hip = GPU_PROPERTIES[name]
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(
        multi_processor_count=40, shared_memory_per_block=48 * 1024, total_memory=2**34, **properties)
    torch.version.hip = hip
    gpu = torch.device("cuda", 0)
    facts = target_of(gpu)

    def need(kernel, args, kwargs, device=gpu):
        return launch.binary_resources(launch.compile_for(kernel, args, kwargs, facts), facts)

    launch._loaded_resources = need
    launched = []
    JITFunction.run = lambda self, *args, grid, warmup=False, **kwargs: launched.append((self, args, kwargs))
    varlen_attention = importlib.import_module("fastssl.ops.varlen_attention")
    with FakeTensorMode():
        q, k, v, out = torch.empty(1604, 4, 6, 64, dtype=torch.float16, device=gpu).unbind(1)
        cu_seqlens = torch.tensor([0, 37, 234, 1604], dtype=torch.int32, device=gpu)
        lse = torch.empty(6, 1604, device=gpu)
        varlen_attention._backward_triton(out, q, k, v, out, lse, cu_seqlens, 0, 0.125, False)
        needs = [(kernel, kwargs, need(kernel, args, kwargs)) for kernel, args, kwargs in launched]
    return asdict(facts), [dict(kernel=kernel.fn.__name__, shared=resources.shared,
                                **{key: value for key, value in kwargs.items() if isinstance(value, int)})
                           for kernel, kwargs, resources in needs]


def gated(c: dict, target) -> bool:
    """A binary whose spills fail the check: launched at a recipe's shape in a 16-bit type the
    target computes in (bf16 only where the GPU has it: the trainers use fp16 on the others)."""
    return bool(c["recipes"]) and (c["dtype"] == "fp16" or (c["dtype"] == "bf16" and target.bf16))


def problems(name: str, compiled: list[dict]) -> list[str]:
    """What fails the check on target ``name``."""
    limit = TARGETS[name].shared_memory
    found = []
    for c in compiled:
        where = f"{name}: {c['kernel']} {c['dtype']} ({c['constants']})"
        if c["error"]:
            found.append(f"{where} does not compile: {c['error']}")
        elif c["binary"]["shared"] > limit:
            found.append(f"{where} needs {c['binary']['shared']} bytes of shared memory; the GPU has {limit}")
        elif gated(c, TARGETS[name]) and c["binary"]["spills"]:
            found.append(f"{where} spills ({c['binary']['spills']} spill instructions or registers, "
                         f"{c['binary']['registers']} registers); recipes: {'; '.join(c['recipes'])}")
    return found


def report(results: dict) -> str:
    lines = ["| target | kernel | dtype | configuration | recipe | registers | spills | shared | matrix |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for name, compiled in results.items():
        for c in sorted(compiled, key=lambda c: (c["kernel"], c["dtype"], c["constants"])):
            recipes = "; ".join(c["recipes"]) or "-"
            b = c["binary"]
            cells = (f"{b['registers']} | {b['spills']} | {b['shared'] // 1024} KiB | {b['matrix'] or '-'}" if b
                     else f"does not compile: {c['error']} | | |")
            lines.append(f"| {name} | `{c['kernel']}` | {c['dtype']} | {c['constants']} | {recipes} | {cells} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """Per target: configurations, compile failures, the largest shared memory against the
    limit, spills in the gated (recipe, 16-bit) binaries and elsewhere, matrix instructions."""
    lines = ["| target | arch | configurations | compile failures | largest shared memory / the GPU's "
             "| gated binaries that spill | other binaries that spill | matrix instructions |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for name, compiled in results.items():
        target = TARGETS[name]
        built = [c for c in compiled if c["binary"]]
        largest = max((c["binary"]["shared"] for c in built), default=0)
        spilling = [c for c in built if c["binary"]["spills"]]
        gated_spills = sum(gated(c, target) for c in spilling)
        matrix = sorted({c["binary"]["matrix"] for c in built if c["binary"]["matrix"]})
        lines.append(f"| {name} | {target.arch} | {len(compiled)} | {len(compiled) - len(built)} | "
                     f"{largest // 1024} / {target.shared_memory // 1024} KiB | {gated_spills} | "
                     f"{len(spilling) - gated_spills} | "
                     f"{', '.join(matrix)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the CUDA C++ kernels (kernels/*.cu)

PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SHARED = re.compile(r"(\d+) bytes smem")  # absent where a kernel has none


def ptxas_report(log: str) -> list[dict]:
    """Per kernel of ``ptxas -v``'s log: registers, spilled bytes, stack frame, shared memory."""
    kernels = []
    for entry in log.split("Compiling entry function '")[1:]:
        frame, shared = PTXAS_FRAME.search(entry), PTXAS_SHARED.search(entry)
        kernels.append({"kernel": entry.split("'")[0], "registers": int(PTXAS_REGISTERS.search(entry)[1]),
                        "spill_bytes": int(frame[2]) + int(frame[3]), "stack": int(frame[1]),
                        "shared": int(shared[1]) if shared else 0})
    return kernels


def nvcc_options() -> list[str]:
    """The CUDA compile options of CMakeLists.txt, which builds fastssl._C (one source of truth)."""
    found = re.search(r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", (ROOT / "CMakeLists.txt").read_text())
    return found[1].split() + ["-std=c++17", f"-I{ROOT / 'csrc'}", "-DFASTSSL_WITH_CUDA"]


def demangled(names: list[str]) -> list[str]:
    """Kernel names without return type, namespaces and parameters: ``row_lse_kernel<__half, true>``."""
    plain = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [name.replace("(anonymous namespace)::", "").removeprefix("void ").replace("fastssl::", "")
             for name in plain]
    return [name.split("(")[0] for name in short] if len(short) == len(names) else names


def compile_cuda_kernels(name: str) -> dict:
    """kernels/*.cu compiled for NVIDIA target ``name`` as CMakeLists.txt builds them, with
    ptxas's report per kernel; or why they were not (no nvcc, or one that cannot build it)."""
    target = TARGETS[name]
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None:
        return {"skipped": "no nvcc on the PATH", "kernels": []}
    version = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                           text=True).stdout)[1]
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    if f"compute_{target.capability}" not in listed:
        return {"skipped": f"nvcc {version} does not build {target.arch}", "kernels": []}
    kernels = []
    for source in sorted((ROOT / "kernels").glob("*.cu")):
        with tempfile.TemporaryDirectory() as scratch:
            built = subprocess.run([nvcc, *nvcc_options(), f"-arch={target.arch}", "-cubin", "-Xptxas", "-v",
                                    "-o", str(Path(scratch) / "kernels.cubin"), str(source)],
                                   capture_output=True, text=True)
        if built.returncode:
            return {"error": f"{source.name}: {built.stderr.strip()[-300:]}", "kernels": kernels}
        report = ptxas_report(built.stderr)
        for kernel, short in zip(report, demangled([kernel["kernel"] for kernel in report])):
            kernels.append({"file": source.name, **kernel, "kernel": short})
    return {"nvcc": version, "kernels": kernels}


def cuda_summary(results: dict) -> str:
    """Per NVIDIA target: the CUDA C++ kernels' registers, spills and frames, or why not built."""
    lines = ["| target | arch | nvcc | kernels | most registers | spilled bytes | stack frames | static shared |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, built in results.items():
        arch = TARGETS[name].arch
        if "skipped" in built or "error" in built:
            lines.append(f"| {name} | {arch} | {built.get('skipped') or 'does not compile'} | | | | | |")
            continue
        kernels = built["kernels"]
        lines.append(f"| {name} | {arch} | {built['nvcc']} | {len(kernels)} | "
                     f"{max(k['registers'] for k in kernels)} | {sum(k['spill_bytes'] for k in kernels)} | "
                     f"{sum(k['stack'] for k in kernels)} | {max(k['shared'] for k in kernels)} B |")
    return "\n".join(lines)


def cuda_problems(name: str, built: dict) -> list[str]:
    found = [f"{name}: kernels/{built['error']}"] if "error" in built else []
    return found + [f"{name}: kernels/{k['file']} {k['kernel']} spills {k['spill_bytes']} bytes "
                    f"({k['registers']} registers)" for k in built["kernels"] if k["spill_bytes"]]


def readme_tables(results: dict, cuda: dict) -> str:
    return (summary(results) + "\n\nThe CUDA C++ kernels (kernels/*.cu, built by CMakeLists.txt's options; "
            "dynamic shared memory is sized at launch):\n\n" + cuda_summary(cuda))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", nargs="+", default=["all"], metavar="NAME",
                        help=f"targets (default: all = {' '.join(ARCHITECTURES)}; any of {', '.join(TARGETS)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="targets compiled at once")
    parser.add_argument("--report", action="store_true", help="print every binary's resources (markdown)")
    parser.add_argument("--readme", action="store_true", help="write the per-target summary into README.md")
    parser.add_argument("--check-readme", action="store_true", help="fail if README.md's summary is not this run's")
    parser.add_argument("--json", type=Path, help="write every binary's resources as JSON")
    args = parser.parse_args()
    names = list(ARCHITECTURES) if args.target == ["all"] else args.target
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    nvidia = [name for name in names if TARGETS[name].vendor == "cuda"]
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(names))) as pool:
        cuda_jobs = [pool.submit(compile_cuda_kernels, name) for name in nvidia]
        results = dict(zip(names, pool.map(compile_target, names)))
        cuda = {name: job.result() for name, job in zip(nvidia, cuda_jobs)}
    for name, compiled in results.items():
        built = [c for c in compiled if c["binary"]]
        print(f"{name} ({TARGETS[name].arch}): {len(compiled)} configurations of "
              f"{len({c['kernel'] for c in compiled})} kernels, {len(built)} compiled, largest shared memory "
              f"{max((c['binary']['shared'] for c in built), default=0)} of {TARGETS[name].shared_memory} bytes")
    tables = readme_tables(results, cuda)
    print(tables)
    if args.report:
        print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"triton": results, "cuda": cuda}, indent=1))
    if args.readme:
        from fastssl.benchmark import replace_marked_section

        replace_marked_section(ROOT / "README.md", README_BEGIN, README_END, tables)
    failures = [line for name, compiled in results.items() for line in problems(name, compiled)]
    in_readme = (ROOT / "README.md").read_text().split(README_BEGIN)[1].split(README_END)[0].strip()
    if args.check_readme and in_readme != tables:
        failures.append("README.md's kernel resources are not what this run measured (regenerate: --readme)")
    failures += [line for name, built in cuda.items() for line in cuda_problems(name, built)]
    for line in failures:
        print(f"FAILS: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
