"""Benchmark harness shared by every op's script in benchmarks/.

In ONE process: measure the device's own ceilings (a large matmul, bf16 on a GPU, a large
device-to-device copy), then time every contender on the same inputs (median of CUDA-event
timings after warm-up, via ``triton.testing.do_bench``), record peak memory, achieved GB/s
and TFLOP/s against the op's minimal traffic and FLOPs, the percentage of the measured
ceiling, and the speed-up of the first contender over every other. Results go to
``benchmarks/results/<gpu>/<op>.json`` with a markdown table and a PNG plot.

``--smoke`` runs tiny sizes on the CPU (CI keeps the scripts alive that way); its numbers
mean nothing and are written to a temporary directory unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]


BEST_OTHER = "the fastest other contender"


@dataclass
class Case:
    """One input shape: its contenders (the first is the one the ratios are about), the
    bytes and FLOPs the op must move and do at minimum, and the README's goals for it:
    ``speedup_goals`` {contender (or BEST_OTHER): times faster the first must be},
    ``memory_goals`` {contender: times less peak memory}, ``copy_goal_pct`` (% of the
    measured copy bandwidth the first must reach)."""

    name: str
    contenders: list[Contender]
    min_bytes: int = 0
    min_flops: int = 0
    params: dict = field(default_factory=dict)
    speedup_goals: dict = field(default_factory=dict)
    memory_goals: dict = field(default_factory=dict)
    copy_goal_pct: Optional[float] = None


def replace_marked_section(path: Path, begin: str, end: str, body: str) -> bool:
    """Replace the text between the ``begin`` and ``end`` markers of a file (the README's
    generated sections); True if the file changed."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    updated = f"{head}{begin}\n{body}\n{end}{tail}"
    if updated != text:
        path.write_text(updated)
    return updated != text


def add_harness_arguments(parser: argparse.ArgumentParser, *, cpu_help: str, no_compile_help: str) -> None:
    """The flags benchmarks/run_all.py passes to every benchmark (see :func:`results_dir`)."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; numbers are meaningless")
    parser.add_argument("--out", type=Path, default=None,
                        help="results root (default benchmarks/results; smoke: a temporary directory)")
    parser.add_argument("--no-compile", action="store_true", help=no_compile_help)
    parser.add_argument("--cpu", action="store_true", help=cpu_help)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    add_harness_arguments(parser, cpu_help="real sizes on the CPU: the C++ kernels against the reference (no Triton)",
                          no_compile_help="skip torch.compile contenders")
    return parser.parse_args()


def kernel_backends(device: torch.device, smoke: bool) -> list[str]:
    """The kernel backends an op with native kernels is timed on: Triton and CUDA on a GPU
    (or on the meta device, which stands for one when a GPU run is planned without it), C++
    on the CPU (plus the Triton interpreter in smoke runs, to keep its launch path alive)."""
    if device.type in ("cuda", "meta"):
        return ["triton", "cuda"]
    return ["triton", "cpp"] if smoke else ["cpp"]


def benchmark_device(args: argparse.Namespace) -> torch.device:
    if args.smoke or args.cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks need a CUDA device; use --smoke to exercise them on the CPU")
    return torch.device("cuda")


def time_ms(fn: Callable[[], object], device: torch.device, cpu_samples: int = 3) -> float:
    """Median milliseconds per call after warm-up (on the CPU, of ``cpu_samples`` calls)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_samples):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one call, beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_ceilings(device: torch.device, smoke: bool) -> dict:
    """The device's own matmul TFLOP/s (bf16 on a GPU; float32 on the CPU, where bf16 may
    have no hardware support) and device-to-device copy GB/s."""
    n = 256 if smoke else (2048 if device.type == "cpu" else 8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = time_ms(lambda: a @ b, device)
    copy_elements = (1 << 16) if smoke else (1 << 28 if device.type == "cuda" else 1 << 26)  # 1 GiB on a GPU
    src = torch.empty(copy_elements, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    return {
        "matmul_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "copy_gbps": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9,  # read + write
        "matmul_size": n,
        "copy_bytes": src.numel() * 4,
    }


def run_case(case: Case, device: torch.device, ceilings: dict, smoke: bool = False) -> dict:
    """Time every contender (smoke: one sample each, the numbers mean nothing)."""
    rows = []
    for contender in case.contenders:
        try:
            contender.fn()  # compile, autotune, catch failures before timing
            ms = time_ms(contender.fn, device, cpu_samples=1 if smoke else 3)
            memory = peak_memory_bytes(contender.fn, device)
        except Exception as error:  # a contender that cannot run is reported, not fatal
            rows.append({"contender": contender.name, "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        row = {"contender": contender.name, "median_ms": ms, "peak_memory_bytes": memory}
        if case.min_bytes:
            row["gbps"] = case.min_bytes / (ms * 1e-3) / 1e9
            row["pct_copy_ceiling"] = 100 * row["gbps"] / ceilings["copy_gbps"]
        if case.min_flops:
            row["tflops"] = case.min_flops / (ms * 1e-3) / 1e12
            row["pct_matmul_ceiling"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
        rows.append(row)
    first = rows[0].get("median_ms")
    for row in rows[1:]:
        if first and "median_ms" in row:
            row["speedup_of_first"] = row["median_ms"] / first
    result = {"case": case.name, "params": case.params, "min_bytes": case.min_bytes,
              "min_flops": case.min_flops, "results": rows}
    return {**result, "goals": goal_outcomes(case, rows)}


def goal_outcomes(case: Case, rows: list[dict]) -> list[dict]:
    """Each of the case's goals: its kind ("speed", "memory", "bandwidth"), the contender it
    is against, target, measured value and whether it was met (None when a contender it
    needs did not run)."""
    first, by_name = rows[0], {row["contender"]: row for row in rows}
    timed = [row for row in rows[1:] if "median_ms" in row]
    outcomes = []
    for name, target in case.speedup_goals.items():
        other = min(timed, key=lambda row: row["median_ms"], default=None) if name == BEST_OTHER else by_name.get(name)
        value = other["median_ms"] / first["median_ms"] if other and "median_ms" in other and "median_ms" in first \
            else None
        against = other["contender"] if other else name
        text = f"{target:g}x faster than " + (f"{name} ({against})" if name == BEST_OTHER else name)
        outcomes.append(dict(kind="speed", against=against, goal=text, target=target, value=value))
    for name, target in case.memory_goals.items():
        other = by_name.get(name, {})
        value = other["peak_memory_bytes"] / first["peak_memory_bytes"] \
            if other.get("peak_memory_bytes") and first.get("peak_memory_bytes") else None
        outcomes.append(dict(kind="memory", against=name, goal=f"{target:g}x less peak memory than {name}",
                             target=target, value=value))
    if case.copy_goal_pct is not None:
        outcomes.append(dict(kind="bandwidth", against=None, goal=f"{case.copy_goal_pct:g}% of copy bandwidth",
                             target=case.copy_goal_pct, value=first.get("pct_copy_ceiling")))
    for outcome in outcomes:
        outcome["met"] = None if outcome["value"] is None else outcome["value"] >= outcome["target"]
    return outcomes


def current_commit() -> str:
    """The checkout's short commit hash ("" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def readme_table_from(results: Path, begin: str, end: str, table: Callable[[dict], str]) -> int:
    """``--readme`` of the CPU result scripts: the README's marked table regenerated from a
    stored results document."""
    updated = replace_marked_section(REPO_ROOT / "README.md", begin, end, table(json.loads(results.read_text())))
    print("README.md updated" if updated else "README.md already current")
    return 0


def metadata(device: torch.device) -> dict:
    commit = current_commit()
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def results_dir(args: argparse.Namespace, meta: dict) -> Path:
    if args.out is None and args.smoke:
        return Path(tempfile.mkdtemp(prefix="fastssl-bench-smoke-"))
    root = args.out or DEFAULT_RESULTS
    folder = meta["device"].replace("NVIDIA ", "").replace(" ", "-") if not args.smoke else "smoke-cpu"
    return root / folder


def _format_bytes(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def markdown_table(op: str, meta: dict, ceilings: dict, cases: list[dict]) -> str:
    lines = [
        f"# {op} on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}.",
        f"Measured ceilings: {ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.3g} TFLOP/s, "
        f"device copy {ceilings['copy_gbps']:.0f} GB/s.",
        "",
        "| case | contender | median ms | GB/s (min bytes) | % of copy | TFLOP/s (min FLOPs) | % of matmul "
        "| peak memory | first is x faster |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for row in case["results"]:
            if "error" in row:
                lines.append(f"| {case['case']} | {row['contender']} | failed: {row['error']} | | | | | | |")
                continue
            gbps = f"{row['gbps']:.0f}" if "gbps" in row else "-"
            pct = f"{row['pct_copy_ceiling']:.0f}%" if "pct_copy_ceiling" in row else "-"
            tflops = f"{row['tflops']:.1f}" if "tflops" in row else "-"
            pct_matmul = f"{row['pct_matmul_ceiling']:.0f}%" if "pct_matmul_ceiling" in row else "-"
            speedup = f"{row['speedup_of_first']:.2f}x" if "speedup_of_first" in row else ""
            lines.append(
                f"| {case['case']} | {row['contender']} | {row['median_ms']:.4f} | {gbps} | {pct} | "
                f"{tflops} | {pct_matmul} | {_format_bytes(row['peak_memory_bytes'])} | {speedup} |"
            )
    goals = goals_markdown(cases)
    return "\n".join(lines) + "\n" + (f"\n{goals}\n" if goals else "")


def goals_markdown(cases: list[dict]) -> str:
    """One row per goal of the README measured in ``cases``: target, measured, met."""
    lines = ["| case | goal | measured | met |", "|---|---|---|---|"]
    for case in cases:
        for goal in case.get("goals", []):
            unit = "%" if goal["kind"] == "bandwidth" else "x"
            value = "not measured" if goal["value"] is None else f"{goal['value']:.3g}{unit}"
            met = "-" if goal["met"] is None else "yes" if goal["met"] else "**no**"
            lines.append(f"| {case['case']} | {goal['goal']} | {value} | {met} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(op: str, cases: list[dict], path: Path) -> None:
    """Per case and contender, how many times faster the first contender is (left) and how
    many times less peak memory it takes (right, where measured), on log axes from parity
    (1x; green: the first is ahead, red: behind), the goals as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (label, speed-up, memory ratio, speed goal, memory goal)
    for case in cases:
        first = case["results"][0]
        goals = {(g["kind"], g["against"]): g["target"] for g in case.get("goals", [])}
        for row in case["results"][1:]:
            name = row["contender"]
            speedup = row["median_ms"] / first["median_ms"] if "median_ms" in row and "median_ms" in first else None
            memory = (row["peak_memory_bytes"] / first["peak_memory_bytes"]
                      if row.get("peak_memory_bytes") and first.get("peak_memory_bytes") else None)
            rows.append((f"{case['case']}\n{first['contender']} vs {name}", speedup, memory,
                         goals.get(("speed", name)), goals.get(("memory", name))))
    if not rows:
        return
    panels = [(1, "times faster")] + ([(2, "times less peak memory")] if any(row[2] for row in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3, 0.42 * len(rows) + 1.5), squeeze=False)
    positions = list(range(len(rows)))[::-1]
    for axis, (index, title) in zip(axes[0], panels):
        values = [row[index] or math.nan for row in rows]
        axis.barh(positions, [abs(value - 1) for value in values], left=[min(value, 1) for value in values],
                  color=["tab:green" if value >= 1 else "tab:red" for value in values], height=0.7)
        for position, row, value in zip(positions, rows, values):
            if row[index + 2]:
                axis.plot([row[index + 2]] * 2, [position - 0.45, position + 0.45], color="black", linewidth=2)
            axis.annotate("not run" if math.isnan(value) else f"{value:.3g}x", (1 if math.isnan(value) else value,
                          position), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        axis.set_xscale("log")
        known = [1] + [value for value in values if not math.isnan(value)] + [row[index + 2] for row in rows
                                                                              if row[index + 2]]
        axis.set_xlim(min(known) / 1.5, max(known) * 3)  # room for the labels right of the bars
        axis.axvline(1, color="grey", linewidth=0.8)
        axis.set_yticks(positions)
        axis.set_yticklabels([row[0] for row in rows] if index == 1 else [], fontsize=7)
        axis.set_xlabel(f"{title} (black: goal)", fontsize=8)
    fig.suptitle(op)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmark(op: str, args: argparse.Namespace,
                  make_cases: Callable[[torch.device, bool, argparse.Namespace], list[Case]]) -> Path:
    """Measure ceilings, run ``make_cases(device, smoke, args)``, write ``<op>.json``,
    ``<op>.md`` and ``<op>.png``."""
    device = benchmark_device(args)
    meta = metadata(device)
    ceilings = measure_ceilings(device, args.smoke)
    cases = []
    for case in make_cases(device, args.smoke, args):
        cases.append(run_case(case, device, ceilings, args.smoke))
        print("\n".join(markdown_table(op, meta, ceilings, cases[-1:]).splitlines()[-len(case.contenders):]))
    out = results_dir(args, meta)
    out.mkdir(parents=True, exist_ok=True)
    document = {"op": op, **meta, "ceilings": ceilings, "smoke": args.smoke, "cases": cases}
    (out / f"{op}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / f"{op}.md").write_text(markdown_table(op, meta, ceilings, cases))
    plot(op, cases, out / f"{op}.png")
    print(f"wrote {out / op}.json/.md/.png")
    return out


def under_autocast(fn: Callable, device: torch.device) -> Callable:
    """``fn`` under bf16 autocast: the original code as a mixed-precision trainer runs it."""
    def run(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args)
    return run


def compiled(fn: Callable, args: argparse.Namespace) -> Optional[Callable]:
    """``torch.compile(fn)`` unless --no-compile; None when skipped."""
    if args.no_compile:
        return None
    return torch.compile(fn)
