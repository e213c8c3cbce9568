"""Differentiable sorting networks and NeCo's loss, forward + backward: fastssl's kernels
(Triton, CUDA, C++) vs diffsort (eager and torch.compile) and vs diffsort + NeCo's cross-entropy.

Cases (REFERENCE.md sections 4 and 5): NeCo's sort (3136 rows of 49, bitonic, cauchy,
steepness 100), n in {16, 32, 64, 128, 256} (bitonic, cauchy, 4096 rows), and the NeCo loss
on 3136 rows (student and teacher sorts + cross-entropy). Minimal traffic per row: read x,
write x_sorted and P, read x and both output gradients, write dL/dx
(:func:`fastssl.ops.soft_sort.soft_sort_bytes`); minimal FLOPs: the two-column formulation's
(:func:`fastssl.ops.soft_sort.soft_sort_flops`).

    python benchmarks/bench_soft_sort.py            # on a CUDA GPU: triton and cuda backends
    python benchmarks/bench_soft_sort.py --cpu      # NeCo's shapes on the CPU: the cpp backend
    python benchmarks/bench_soft_sort.py --smoke    # tiny, on the CPU

``--cpu`` runs only NeCo's cases: diffsort needs minutes per call at the larger sizes there.
"""

import importlib
import os
import sys

if "--smoke" in sys.argv:  # the kernels run on the CPU only interpreted; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastssl  # noqa: E402
from fastssl.benchmark import Case, Contender, compiled, kernel_backends, parse_args, run_benchmark  # noqa: E402
from fastssl.ops import neco_loss, soft_sort  # noqa: E402

soft_sort_module = importlib.import_module("fastssl.ops.soft_sort")  # fastssl.ops exports the function

NECO_ROWS, NECO_N, STEEPNESS = 3136, 49, 100.0
SIZES = [16, 32, 64, 128, 256]
SIZE_ROWS = 4096


def diffsort_sort(n):
    try:
        import diffsort
    except ImportError:
        return None
    return diffsort.DiffSortNet("bitonic", n, steepness=STEEPNESS, distribution="cauchy")


def sort_step(sort_fn, x, grad_sorted, grad_P):
    def step():
        x.grad = None
        x_sorted, P = sort_fn(x)
        torch.autograd.backward((x_sorted, P), (grad_sorted, grad_P))
    return step


def fastssl_sort(backend):
    def sort(v):
        with fastssl.use_backend(backend):
            return soft_sort(v, STEEPNESS, "bitonic", "cauchy")
    return sort


def sort_case(device, args, rows, n, name):
    x = torch.rand(rows, n, device=device).requires_grad_()
    grad_sorted, grad_P = torch.randn(rows, n, device=device), torch.randn(rows, n, n, device=device)
    contenders = [Contender(f"fastssl ({backend})", sort_step(fastssl_sort(backend), x, grad_sorted, grad_P))
                  for backend in kernel_backends(device, args.smoke)]
    theirs = diffsort_sort(n)
    if theirs is not None:
        theirs.sorting_network = [[m.to(device) for m in layer] for layer in theirs.sorting_network]
        contenders.append(Contender("diffsort (eager)", sort_step(theirs, x, grad_sorted, grad_P)))
        theirs_compiled = compiled(theirs, args)
        if theirs_compiled is not None:
            contenders.append(Contender("diffsort (torch.compile)",
                                        sort_step(theirs_compiled, x, grad_sorted, grad_P)))
    return Case(name, contenders, min_bytes=soft_sort_module.soft_sort_bytes(rows, n, torch.float32),
                min_flops=soft_sort_module.soft_sort_flops(rows, "bitonic", n),
                params={"rows": rows, "n": n, "network": "bitonic", "distribution": "cauchy",
                        "steepness": STEEPNESS},
                speedup_goals={"diffsort (eager)": 100.0}, memory_goals={"diffsort (eager)": 20.0})


def neco_case(device, args, rows):
    student = (torch.rand(rows, NECO_N, device=device) * 2 - 1).requires_grad_()
    teacher = (student.detach() + 0.1 * torch.randn_like(student)).clamp(-1, 1)
    theirs = diffsort_sort(NECO_N)

    def fused(backend):
        def run():
            student.grad = None
            with fastssl.use_backend(backend):
                neco_loss(student, teacher, STEEPNESS, STEEPNESS).backward()
        return run

    def unfused(sort):
        def loss(s, t):
            with torch.no_grad():
                _, P_t = sort(t)
            _, P_s = sort(s)
            return -(P_t * torch.log(P_s)).sum(-1).mean()
        return loss

    def step(loss_fn):
        def run():
            student.grad = None
            loss_fn(student, teacher).backward()
        return run

    backends = kernel_backends(device, args.smoke)
    contenders = [Contender(f"fastssl fused neco_loss ({backend})", fused(backend)) for backend in backends]
    if theirs is not None:
        theirs.sorting_network = [[m.to(device) for m in layer] for layer in theirs.sorting_network]
        contenders.append(Contender("diffsort + cross-entropy (eager)", step(unfused(theirs))))
        loss_compiled = compiled(unfused(theirs), args)
        if loss_compiled is not None:
            contenders.append(Contender("diffsort + cross-entropy (torch.compile)", step(loss_compiled)))
    contenders.append(Contender(f"fastssl soft_sort ({backends[0]}) + cross-entropy",
                                step(unfused(fastssl_sort(backends[0])))))
    flops = 2 * soft_sort_module.soft_sort_flops(rows, "bitonic", NECO_N)
    return Case(f"NeCo loss {rows} x {NECO_N} bitonic cauchy s=100", contenders,
                min_bytes=3 * rows * NECO_N * 4, min_flops=flops, params={"rows": rows, "n": NECO_N},
                speedup_goals={"diffsort + cross-entropy (eager)": 200.0})


def make_cases(device, smoke, args):
    neco_rows = 2 if smoke else NECO_ROWS
    cases = [sort_case(device, args, neco_rows, NECO_N, f"NeCo sort {neco_rows} x {NECO_N} bitonic cauchy s=100")]
    for n in SIZES[:2] if smoke else [] if args.cpu else SIZES:
        rows = 4 if smoke else SIZE_ROWS
        cases.append(sort_case(device, args, rows, n, f"sort {rows} x {n} bitonic cauchy s=100"))
    cases.append(neco_case(device, args, neco_rows))
    return cases


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("soft_sort", args, make_cases)


if __name__ == "__main__":
    main()
