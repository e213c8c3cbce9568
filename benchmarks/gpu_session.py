"""One budgeted GPU session: everything a short GPU window should measure, in priority order.

    python benchmarks/gpu_session.py --budget-s 480 --out DIR     # on the GPU (fastssl bench gpu-session)
    python benchmarks/gpu_session.py --dry-run                    # the plan and its time estimates
    python benchmarks/gpu_session.py --smoke --out DIR            # the whole sequence, tiny, on the CPU
    python benchmarks/gpu_session.py --resume DIR/results.jsonl --out DIR2   # a later window goes on

Phases, each a list of steps with a time estimate; a step starts only if the time left covers
its estimate (otherwise it is recorded as skipped, with the reason), so the session ends
inside the budget:

0. environment: GPU, driver, torch/triton/CUDA versions, ``fastssl info``, the measured
   ceilings (bf16 matmul, copy bandwidth), whether fastssl._C has CUDA code for this GPU;
1. correctness on the GPU: each op at one recipe shape in bf16, forward and backward, on the
   triton and cuda backends, under the accuracy rule of tests/accuracy.py; then the accuracy
   test suite itself (``pytest -m gpu``, the bounds of the CPU runs and the GPU's own math),
   stopped after ACCURACY_SUITE_S seconds; the phase is capped at CORRECTNESS_CAP_S;
2. the headline case of every op with all its contenders (benchmarks/bench_*.py's cases);
3. end to end: the dino-vits16 training step, kernels on and off;
4. whatever is left while the budget lasts: the other cases and recipes (neco-vits14 first).

Every finished step is appended at once to DIR/results.jsonl (flushed), so a kill at any
moment keeps what finished; at the end DIR/summary.md (ending with every goal the README
states and whether it was met) and DIR/summary.png are written: three files, no folders.

Estimates (seconds) are not measurements: no GPU run exists yet. They count each step's
first calls, which dominate a short session: a Triton kernel's JIT compile (KERNEL_S per
fastssl contender), torch.compile of a contender (COMPILE_S), eager contenders (EAGER_S,
CUDA/cuBLAS warm-up included), plus the timing itself (do_bench: 25 ms warm-up, 100 ms of
repetitions, a peak-memory call). Each record holds its step's measured wall time, to
replace these figures after the first window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(BENCHMARKS), str(REPO / "tests")]  # the op benchmarks' cases, the accuracy rule

import torch  # noqa: E402

import fastssl  # noqa: E402
from fastssl.benchmark import goals_markdown, measure_ceilings, run_case  # noqa: E402

EAGER_S, KERNEL_S, COMPILE_S = 2.0, 5.0, 15.0
ENVIRONMENT_S, CORRECTNESS_CAP_S, ACCURACY_SUITE_S = 20.0, 180.0, 90.0
# The GPU's accuracy tests in priority order: the files whose kernels run every recipe's step
# first, the regression tests of defects the CPU tests could not see near the top of theirs.
ACCURACY_SUITE = ("tests/test_varlen_attention.py", "tests/test_barlow_twins.py", "tests/test_dino_loss.py",
                  "tests/test_info_nce.py", "tests/test_sinkhorn.py", "tests/test_soft_sort.py",
                  "tests/test_neco_loss.py", "tests/test_soft_sort_native.py")
# e2e: building both paths' models and the batch, then 2 + 8 + 1 steps of each path (warm-up,
# timed, profiled); the NeCo reference path sorts densely, seconds per step.
E2E_S = {"dino-vits16": 45.0, "neco-vits14": 75.0, "dinov2-vitl14": 120.0, "swav-rn50": 60.0, "barlow-rn50": 60.0}
MAX_FILES = 8


@dataclass
class Step:
    phase: int
    name: str
    estimate_s: float
    run: Callable[[], dict]


# ---------------------------------------------------------------------------- phase 0


def environment(device: torch.device, smoke: bool) -> dict:
    from fastssl import _native
    from fastssl.cli import info

    record = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "fastssl_info": info(), "ceilings": measure_ceilings(device, smoke)}
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    for package in ("xformers", "diffsort", "timm"):
        try:
            record[package] = __import__(package).__version__
        except Exception as error:  # recorded: a contender that needs it will say so too
            record[package] = f"not importable: {type(error).__name__}: {error}"[:200]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record["gpu"] = torch.cuda.get_device_name(device)
        record["capability"] = f"sm_{major}{minor}"
        try:
            record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            record["driver"] = f"nvidia-smi failed: {error}"
        status = _native.cuda_reason() or _native.native().cuda_status
        record["native_cuda"] = status
        record["native_cuda_for_this_gpu"] = _native.cuda_reason(device) is None
    else:
        record["gpu"] = None
        record["native_cuda"] = _native.cuda_reason()
    return record


# ---------------------------------------------------------------------------- phase 1


def _accuracy_check(name: str, outputs: dict, baseline: dict, exact: dict) -> dict:
    """The accuracy rule per output (tests/accuracy.py): the kernel's error at most 2x that of
    the plain-PyTorch reference run on the same (bf16) inputs, plus the rounding of the
    output's dtype."""
    from accuracy import max_error, output_rounding

    checks, passed = [], True
    for key, value in outputs.items():
        error = max_error(value, exact[key])
        bound = 2 * max_error(baseline[key], exact[key]) + output_rounding(exact[key], value.dtype)
        finite = bool(torch.isfinite(value).all())
        checks.append({"output": key, "error": error, "bound": bound, "finite": finite})
        passed = passed and finite and error <= bound
    return {"check": name, "passed": passed, "outputs": checks}


def _with_grads(fn, leaves: dict, weights: dict) -> dict:
    """fn(**leaves) -> dict of outputs; returns them and the gradients of sum(output *
    weight) with respect to each leaf."""
    leaves = {key: value.detach().clone().requires_grad_() for key, value in leaves.items()}
    outputs = fn(**leaves)
    total = sum((outputs[key].double() * weight).sum() for key, weight in weights.items())
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {**{key: value.detach() for key, value in outputs.items()},
            **{f"grad {key}": grad for key, grad in zip(leaves, grads)}}


def correctness_steps(device: torch.device, smoke: bool) -> list[Step]:
    """One recipe shape per op, bf16 in, forward and backward against the float64 reference.
    Inputs are built when a check runs (none is allocated for a skipped one)."""
    from fastssl import ops
    from fastssl.ops.dino_loss import dino_pair_weights
    from fastssl.reference.attention import varlen_attention_reference
    from fastssl.reference.barlow_twins import barlow_twins_loss_original
    from fastssl.reference.diffsort import soft_sort_reference
    from fastssl.reference.dino import dino_cross_entropy_reference
    from fastssl.reference.neco import neco_loss_rows_reference
    from fastssl.reference.sinkhorn import sinkhorn_knopp_log_domain

    def randn(*shape, seed, dtype=torch.float32):
        return torch.randn(*shape, generator=torch.Generator(device).manual_seed(seed), device=device, dtype=dtype)

    def sinkhorn():
        rows, K = (8, 256) if smoke else (128, 65536)
        scores = (torch.rand(rows, K, generator=torch.Generator(device).manual_seed(0), device=device) * 2 - 1)
        return (lambda scores: {"q": ops.sinkhorn_knopp(scores, 0.04, 3)},
                lambda scores: {"q": sinkhorn_knopp_log_domain(scores, 0.04, 3)[0]},
                {"scores": scores.bfloat16()}, None)

    def dino():
        S, T, B, K = (12, 2, 2, 512) if smoke else (12, 2, 16, 65536)
        teacher, center = (randn(T * B, K, seed=2) * 3).bfloat16(), torch.zeros(K, device=device)
        weights = (dino_pair_weights(T, S, device), torch.full((B,), 1.0 / B, device=device))
        return (lambda student: {"loss": ops.dino_cross_entropy(student, teacher, S, T, 0.1, 0.04, center,
                                                                *weights)[0]},
                lambda student: {"loss": dino_cross_entropy_reference(student, teacher.to(student.dtype), S, T, 0.1,
                                                                      0.04, center, *weights)[0]},
                {"student": (randn(S * B, K, seed=1) * 3).bfloat16()}, {"loss": 1.0})

    def barlow(matmul):
        def make():
            N, D = (16, 64) if smoke else (2048, 8192)
            z1 = randn(N, D, seed=3)
            z2 = 0.7 * z1 + 0.5 * randn(N, D, seed=4)
            return (lambda z1, z2: {"loss": ops.barlow_twins_loss(z1, z2, matmul=matmul)},
                    lambda z1, z2: {"loss": barlow_twins_loss_original(z1, z2)},
                    {"z1": z1.bfloat16(), "z2": z2.bfloat16()}, {"loss": 1.0})
        return make

    def attention():
        groups, heads = ([(2, 20), (3, 9)], 2) if smoke else ([(128, 197), (640, 37)], 6)
        lengths = [length for count, length in groups for _ in range(count)]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        qkv = randn(sum(lengths), 3, heads, 64, seed=5).bfloat16()
        return (lambda q, k, v: {"out": ops.varlen_attention(q, k, v, cu_seqlens)},
                lambda q, k, v: {"out": varlen_attention_reference(q, k, v, cu_seqlens)},
                dict(zip("qkv", qkv.unbind(1))), {"out": randn(sum(lengths), heads, 64, seed=6, dtype=torch.float64)})

    def similarity_rows():
        rows = 2 if smoke else 3136
        student = torch.rand(rows, 49, generator=torch.Generator(device).manual_seed(7), device=device) * 2 - 1
        return student.bfloat16(), (student + 0.1 * randn(rows, 49, seed=8)).clamp(-1, 1).bfloat16()

    def nt_xent():
        rows = 8 if smoke else 4096  # images: SimCLR's 2N = 8192 rows
        views = [torch.nn.functional.normalize(randn(rows, 128, seed=11 + view), dim=1).bfloat16() for view in (0, 1)]
        def loss(a, b):
            return {"loss": ops.info_nce(a, b, 0.5, symmetric=True, exclude_self=True)}

        def reference(a, b):
            with fastssl.use_backend("reference"):
                return loss(a, b)

        return loss, reference, dict(zip("ab", views)), {"loss": 1.0}

    def soft_sort():
        x, _ = similarity_rows()
        weights = {"x_sorted": randn(*x.shape, seed=9, dtype=torch.float64),
                   "P": randn(*x.shape, 49, seed=10, dtype=torch.float64)}
        return (lambda x: dict(zip(("x_sorted", "P"), ops.soft_sort(x, 100.0))),
                lambda x: dict(zip(("x_sorted", "P"), soft_sort_reference(x, 100.0))),
                {"x": x}, weights)

    def neco():
        student, teacher = similarity_rows()
        return (lambda s: {"loss": ops.neco_loss(s, teacher.to(s.dtype), 100.0, 100.0)},
                lambda s: {"loss": neco_loss_rows_reference(s, teacher.to(s.dtype), 100.0, 100.0).mean()},
                {"s": student}, {"loss": 1.0})

    def run_check(name, backend, make):
        def run():
            kernel, reference, leaves, weights = make()

            def evaluate(fn, dtype=None):
                inputs = {key: value if dtype is None else value.to(dtype) for key, value in leaves.items()}
                return _with_grads(fn, inputs, weights) if weights else fn(**inputs)

            with fastssl.use_backend(backend):
                outputs = evaluate(kernel)
            return _accuracy_check(f"{name} [{backend}]", outputs, evaluate(reference), evaluate(reference,
                                                                                                  torch.float64))
        return run

    native = "cpp" if smoke else "cuda"  # on the CPU: the interpreter for Triton, C++ for the native kernels
    checks = [("sinkhorn_knopp 128x65536", ("triton", native), sinkhorn),
              ("dino_cross_entropy 16 x (2+10) x 65536", ("triton",), dino),
              ("barlow_twins_loss 2048x8192", ("triton",), barlow("triton")),
              ("barlow_twins_loss 2048x8192, cuBLAS Gram", ("triton",), barlow("cublas")),
              ("varlen_attention DINO crops, 6 heads", ("triton",), attention),
              ("info_nce SimCLR 2N=8192 D=128", ("triton",), nt_xent),
              ("soft_sort 3136x49", ("triton", native), soft_sort),
              ("neco_loss 3136x49", ("triton", native), neco)]
    return [Step(1, f"correctness: {name} [{backend}]", KERNEL_S, run_check(name, backend, make))
            for name, backends, make in checks for backend in backends] + [
        Step(1, "correctness: the accuracy test suite (pytest -m gpu)", ACCURACY_SUITE_S,
             lambda: accuracy_suite(smoke, ACCURACY_SUITE_S))]


def accuracy_suite(smoke: bool, time_box: float) -> dict:
    """``pytest -m gpu`` over ACCURACY_SUITE, stopped after ``time_box`` seconds: the tests
    that finished, their worst error / bound per file, and every failure with its replay
    seed (smoke: one CPU test). Each test's checks are logged as it ends, so a stop keeps them."""
    selection = (["-m", "not gpu", "-k", "recipe_lengths and dtype0", "tests/test_varlen_attention.py"] if smoke
                 else ["-m", "gpu", *ACCURACY_SUITE])
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "accuracy.jsonl"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}",
                   f"--accuracy-log={log}", *selection]
        try:
            subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=time_box)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        tests = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    worst: dict = {}
    for test in tests:
        ratios = [check["error"] / check["bound"] if check["bound"] else math.inf * (check["error"] > 0)
                  for check in test["checks"]]
        file = test["test"].split("::")[0]
        worst[file] = max([worst.get(file, 0.0), *ratios])
    failed = [f"{test['test']} (FASTSSL_TEST_SEED={test['seed']})" for test in tests if test["outcome"] == "failed"]
    return {"suite": "pytest -m gpu", "tests": len(tests), "failed": failed, "worst_error_over_bound": worst,
            "timed_out": timed_out, "passed": bool(tests) and not failed}


# ---------------------------------------------------------------------------- phases 2 and 4


def _estimate(case) -> float:
    total = 0.0
    for contender in case.contenders:
        name = contender.name
        total += COMPILE_S if "torch.compile" in name or "FlexAttention" in name else \
            KERNEL_S if name.startswith("fastssl") else EAGER_S
    return total


def benchmark_steps(device: torch.device, smoke: bool, ceilings: Callable[[], dict]) -> tuple[list, list]:
    """(headline steps, the other cases): every case of benchmarks/bench_*.py, run by the
    harness's run_case with the session's measured ceilings."""
    import bench_barlow_twins
    import bench_dino_loss
    import bench_info_nce
    import bench_packed_vit
    import bench_sinkhorn
    import bench_soft_sort
    import bench_varlen_attention

    # Smoke runs skip torch.compile (minutes of C++ compilation on a CPU) to stay under a minute.
    args = argparse.Namespace(smoke=smoke, no_compile=smoke, cpu=False, out=None)
    suites = [("sinkhorn_knopp", bench_sinkhorn, ("DINOv2 ViT-S/B 128x65536", "SwAV 4096x3000")),
              ("dino_loss", bench_dino_loss, ("DINO ViT-S/16 B=64 2+10 crops K=65536 bf16",)),
              ("soft_sort", bench_soft_sort, ("NeCo sort", "NeCo loss")),
              ("barlow_twins", bench_barlow_twins, ("barlow_twins N=2048 D=8192",)),
              ("info_nce", bench_info_nce, ("SimCLR NT-Xent 2N=8192 D=128",)),
              ("varlen_attention", bench_varlen_attention, ("fwd+bwd",)),
              ("packed_vit", bench_packed_vit, ())]
    headline, rest = [], []
    for op, module, headline_names in suites:
        cases = module.make_cases(device, smoke, args)
        headline_cases = [case for case in cases if any(name in case.name for name in headline_names)]
        if smoke and not headline_cases:  # smoke sizes rename some cases: the first stands in
            headline_cases = cases[:1]
        for case in cases:
            is_headline = case in headline_cases
            step = Step(2 if is_headline else 4, f"{op}: {case.name}", _estimate(case),
                        lambda case=case, op=op: {"op": op, **run_case(case, device, ceilings(), smoke)})
            (headline if is_headline else rest).append(step)
    return headline, rest


# ---------------------------------------------------------------------------- phase 3


def e2e_steps(device: torch.device, smoke: bool) -> tuple[list, list]:
    from fastssl.train import bench_e2e

    counts = bench_e2e.Counts(warmup=1, steps=2, profiled=1) if smoke else bench_e2e.Counts(2, 8, 1)

    def step(phase, name):
        return Step(phase, f"e2e: {name}", 10.0 if smoke else E2E_S[name],
                    lambda: bench_e2e.run_recipe(name, device, smoke, counts))
    # Phase 3 takes one recipe: the time of a second went to the accuracy suite in phase 1.
    later = ["neco-vits14"] + [name for name in bench_e2e.RECIPES if name not in ("dino-vits16", "neco-vits14")]
    return [step(3, "dino-vits16")], [step(4, name) for name in later]


# ---------------------------------------------------------------------------- the session


def plan(device: torch.device, smoke: bool) -> list[Step]:
    ceilings: dict = {}

    def measured_ceilings():
        if not ceilings:
            ceilings.update(measure_ceilings(device, smoke))
        return ceilings

    def run_environment():
        record = environment(device, smoke)
        ceilings.update(record["ceilings"])
        return record

    headline, other_cases = benchmark_steps(device, smoke, measured_ceilings)
    e2e_headline, other_recipes = e2e_steps(device, smoke)
    return ([Step(0, "environment", ENVIRONMENT_S, run_environment)] + correctness_steps(device, smoke)
            + headline + e2e_headline + other_cases + other_recipes)


def phase_estimates(steps: list[Step]) -> dict:
    estimates = {}
    for step in steps:
        estimates[step.phase] = estimates.get(step.phase, 0.0) + step.estimate_s
    estimates[1] = min(estimates.get(1, 0.0), CORRECTNESS_CAP_S)
    return estimates


def dry_run(steps: list[Step], budget_s: float) -> int:
    estimates = phase_estimates(steps)
    total = 0.0
    print(f"budget {budget_s:.0f} s; per contender: Triton/CUDA kernel {KERNEL_S:g} s, torch.compile "
          f"{COMPILE_S:g} s, eager {EAGER_S:g} s (assumed; see the docstring)")
    for phase in sorted(estimates):
        names = [step.name for step in steps if step.phase == phase]
        if phase < 4:
            total += estimates[phase]
        print(f"phase {phase}: {len(names)} steps, {estimates[phase]:.0f} s"
              + (f" (cumulative {total:.0f} s)" if phase < 4 else " (runs while budget remains)"))
        for step in steps:
            if step.phase == phase:
                print(f"    {step.estimate_s:5.0f} s  {step.name}")
    fits = total <= budget_s
    print(f"phases 0-3: {total:.0f} s by the estimates, {'within' if fits else 'over'} the {budget_s:.0f} s budget")
    return 0 if fits else 1


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record, default=str) + "\n")
        file.flush()
        os.fsync(file.fileno())


def done_steps(previous: Optional[Path]) -> set:
    if previous is None:
        return set()
    return {record["step"] for record in map(json.loads, previous.read_text().splitlines())
            if record.get("status") == "done"}


def run_session(steps: list[Step], budget_s: float, out: Path, skip: set) -> list[dict]:
    results = out / "results.jsonl"
    start, phase_spent, records = time.monotonic(), {}, []
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        record = {"phase": step.phase, "step": step.name, "estimate_s": step.estimate_s}
        if step.name in skip:
            record.update(status="skipped", reason="done in the resumed session")
        elif step.estimate_s > left:
            record.update(status="skipped", reason=f"{left:.0f} s left, estimate {step.estimate_s:.0f} s")
        elif step.phase == 1 and phase_spent.get(1, 0.0) + step.estimate_s > CORRECTNESS_CAP_S:
            record.update(status="skipped", reason=f"the correctness phase's {CORRECTNESS_CAP_S:.0f} s are spent")
        else:
            began = time.monotonic()
            try:
                record.update(status="done", result=step.run())
            except Exception as error:  # recorded, and the session goes on
                record.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                              traceback=traceback.format_exc()[-4000:])
            record["wall_s"] = time.monotonic() - began
            phase_spent[step.phase] = phase_spent.get(step.phase, 0.0) + record["wall_s"]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _append(results, record)
        records.append(record)
        print(f"[{time.monotonic() - start:6.0f} s] phase {step.phase} {record['status']}: {step.name}", flush=True)
    return records


# ---------------------------------------------------------------------------- summary


def summary_markdown(records: list[dict], budget_s: float) -> str:
    environment_record = next((r["result"] for r in records if r["step"] == "environment" and "result" in r), {})
    spent = sum(record.get("wall_s", 0.0) for record in records)
    lines = [f"# GPU session on {environment_record.get('gpu') or 'the CPU (smoke)'}", "",
             f"torch {environment_record.get('torch')}, triton {environment_record.get('triton')}, CUDA "
             f"{environment_record.get('cuda')}, driver {environment_record.get('driver', '-')}; fastssl._C: "
             f"{environment_record.get('native_cuda')}. {spent:.0f} s of a {budget_s:.0f} s budget.", "",
             "| phase | step | status | wall s (estimate) | result |", "|---|---|---|---|---|"]
    for record in records:
        lines.append(f"| {record['phase']} | {record['step']} | {record['status']} | "
                     f"{record.get('wall_s', 0):.1f} ({record['estimate_s']:.0f}) | {_result_text(record)} |")
    lines += ["", "## Goals", "", _goal_table(records)]
    return "\n".join(lines) + "\n"


def _result_text(record: dict) -> str:
    if record["status"] != "done":
        return record.get("reason") or record.get("error", "")
    result = record["result"]
    if "suite" in result:
        stop = f", stopped at {ACCURACY_SUITE_S:.0f} s" if result["timed_out"] else ""
        worst = max(result["worst_error_over_bound"].values(), default=0.0)
        return (f"{'passed' if result['passed'] else '**failed**'}: {result['tests']} tests{stop}, "
                f"{len(result['failed'])} failed, worst error / bound {worst:.2f}")
    if "check" in result:
        worst = max(result["outputs"], key=lambda o: o["error"] / o["bound"] if o["bound"] else math.inf)
        return f"{'passed' if result['passed'] else '**failed**'}: {worst['output']} error {worst['error']:.2e}, " \
               f"bound {worst['bound']:.2e}"
    if "results" in result:
        first = result["results"][0]
        return f"{first['contender']}: {first.get('median_ms', float('nan')):.3f} ms"
    if "speedup" in result:
        return f"step {result['reference']['step_ms']:.1f} -> {result['fastssl']['step_ms']:.1f} ms, " \
               f"{result['speedup']:.2f}x"
    return ""


def _goal_table(records: list[dict]) -> str:
    cases = [r["result"] for r in records if r["status"] == "done" and "goals" in r.get("result", {})]
    table = goals_markdown(cases)
    lines = table.splitlines() if table else ["| case | goal | measured | met |", "|---|---|---|---|"]
    for record in records:
        result = record.get("result", {})
        if record["status"] == "done" and "speedup" in result:
            lines.append(f"| e2e {result['recipe']} | {result['goal']:g}x faster training step | "
                         f"{result['speedup']:.3g}x | {'yes' if result['goal_met'] else '**no**'} |")
        elif record["step"].startswith("e2e") and record["status"] != "done":
            lines.append(f"| {record['step']} | the step speed-up goal | not measured ({record['status']}) | - |")
    for record in records:
        if record["phase"] in (2, 4) and record["status"] != "done" and not record["step"].startswith("e2e"):
            lines.append(f"| {record['step']} | its goals | not measured ({record['status']}) | - |")
    return "\n".join(lines)


def summary_plot(records: list[dict], path: Path) -> None:
    from fastssl.benchmark import plot
    from fastssl.train.bench_e2e import plot_cases

    done = [record["result"] for record in records if record["status"] == "done"]
    cases = [result for result in done if "results" in result] + plot_cases([r for r in done if "speedup" in r])
    if cases:
        plot("GPU session: fastssl against each contender", cases, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the session may take (default 480)")
    parser.add_argument("--out", type=Path, help="results folder (at most 8 files: results.jsonl, summary.md/.png)")
    parser.add_argument("--smoke", action="store_true", help="the whole sequence on the CPU at tiny sizes")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimates; run nothing")
    parser.add_argument("--resume", type=Path, metavar="RESULTS_JSONL",
                        help="skip the steps a previous session's results.jsonl records as done")


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels' first use
        device = torch.device("cpu")
    elif not args.dry_run:
        if not torch.cuda.is_available():
            raise SystemExit("the GPU session needs a CUDA device; --smoke runs it on the CPU, --dry-run plans it")
        device = torch.device("cuda")
    if args.dry_run:
        return dry_run(plan(device, smoke=True) if args.smoke else plan_for_dry_run(), args.budget_s)
    if args.out is None:
        raise SystemExit("--out DIR is required")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    records = run_session(plan(device, args.smoke), args.budget_s, args.out, done_steps(args.resume))
    (args.out / "summary.md").write_text(summary_markdown(records, args.budget_s))
    summary_plot(records, args.out / "summary.png")
    files = [path for path in args.out.iterdir()]
    assert len(files) <= MAX_FILES and all(path.is_file() for path in files), files
    print(f"wrote {args.out}/results.jsonl, summary.md, summary.png")
    return 0 if all(record["status"] != "failed" and record.get("result", {}).get("passed", True)
                    for record in records) else 1


def plan_for_dry_run() -> list[Step]:
    """The GPU plan's steps and estimates without a GPU: the cases are built on the meta
    device (shapes without memory), which the harness treats as a GPU's stand-in."""
    return plan(torch.device("meta"), smoke=False)


if __name__ == "__main__":
    sys.exit(main())
