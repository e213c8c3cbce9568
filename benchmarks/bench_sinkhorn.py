"""Sinkhorn-Knopp: fastssl's kernels (Triton, CUDA, C++) vs the original PyTorch code, eager and compiled.

Shapes from the recipes (REFERENCE.md section 2). The original is SwAV's / DINOv2's
function (DINOv2 casts the teacher logits to float32 first; so does this baseline).
Minimal traffic: the kernels' own model (fastssl.ops.sinkhorn.sinkhorn_knopp_bytes), i.e.
one read of the scores per half-iteration plus one float32 write of Q; GB/s is reported
against it for every contender, so "% of copy" says how close each is to the bandwidth bound.

    python benchmarks/bench_sinkhorn.py            # on a CUDA GPU: triton and cuda backends
    python benchmarks/bench_sinkhorn.py --cpu      # real sizes on the CPU: the cpp backend
    python benchmarks/bench_sinkhorn.py --smoke    # tiny, on the CPU
"""

import torch

import fastssl
from fastssl.benchmark import Case, Contender, compiled, kernel_backends, parse_args, run_benchmark
from fastssl.ops import sinkhorn_knopp
from fastssl.ops.sinkhorn import sinkhorn_knopp_bytes
from fastssl.reference import sinkhorn_knopp_original

# name, (..., B, K), eps, iterations, input dtype
RECIPES = [
    ("SwAV 4096x3000", (4096, 3000), 0.05, 3, torch.float32),
    ("SwAV 256+3840 queue x3000", (256 + 3840, 3000), 0.05, 3, torch.float32),
    ("DINOv2 ViT-S/B 128x65536", (128, 65536), 0.04, 3, torch.bfloat16),
    ("DINOv2 ViT-g 24x131072", (24, 131072), 0.07, 3, torch.bfloat16),
    ("iBOT 1000x131072", (1000, 131072), 0.07, 3, torch.bfloat16),
    ("Time-Tuning 25088x200 x10", (25088, 200), 0.05, 10, torch.float32),
    ("DoRA 64x196x3 x30", (64, 196, 3), 0.05, 30, torch.float32),
]
# The README's goals, at these cases: % of copy bandwidth, times faster than the original.
GOAL_CASES = ("DINOv2 ViT-S/B 128x65536", "Time-Tuning 25088x200 x10")
COPY_GOAL_PCT, SPEEDUP_GOALS = 80.0, {"original (eager)": 5.0, "original (torch.compile)": 2.0}


def smoke_shape(shape):
    return tuple(max(2, d // 64) if d > 16 else d for d in shape)


def original(scores, eps, n_iters):
    return sinkhorn_knopp_original(scores.float(), eps, n_iters)


def make_cases(device, smoke, args):
    cases = []
    compiled_original = compiled(original, args)
    for name, shape, eps, n_iters, dtype in RECIPES:
        if smoke:
            shape = smoke_shape(shape)
        scores = (torch.rand(shape, device=device) * 2 - 1).to(dtype)

        def fastssl_fn(backend, scores=scores, eps=eps, n_iters=n_iters):
            def run():
                with fastssl.use_backend(backend):
                    return sinkhorn_knopp(scores, eps, n_iters)
            return run

        contenders = [Contender(f"fastssl ({backend})", fastssl_fn(backend))
                       for backend in kernel_backends(device, smoke)]
        contenders.append(Contender("original (eager)", lambda s=scores, e=eps, n=n_iters: original(s, e, n)))
        if compiled_original is not None:
            contenders.append(
                Contender("original (torch.compile)", lambda s=scores, e=eps, n=n_iters: compiled_original(s, e, n))
            )
        cases.append(Case(
            name, contenders,
            min_bytes=sinkhorn_knopp_bytes(shape, dtype, n_iters),
            params={"shape": list(shape), "eps": eps, "n_iters": n_iters, "dtype": str(dtype)},
            **(dict(copy_goal_pct=COPY_GOAL_PCT, speedup_goals=SPEEDUP_GOALS) if name in GOAL_CASES else {}),
        ))
    return cases


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("sinkhorn_knopp", args, make_cases)


if __name__ == "__main__":
    main()
