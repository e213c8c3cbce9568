"""Barlow Twins (and VICReg), forward + backward: fastssl vs the official loss under bf16
autocast, eager and compiled, at (N, D) in {(256, 8192), (2048, 8192), (2048, 2048),
(4096, 1024)}; where N < D also fastssl with the Gram products on cuBLAS (``matmul="cublas"``),
which decides the Gram form's default matmul on a GPU.

Minimal FLOPs: the cheaper formulation's matmuls, min(6 N^2 D, 6 N D^2) (Gram: the upper
triangles of G1, G2 forward, G2 z1n and G1 z2n backward; cross-correlation: C forward, two
products backward; VICReg: one symmetric Gram matrix and one product per view).
Distributed communication per rank and step (computed, not measured; W ranks, bf16
embeddings): Gram form all-gathers both views, 2 N_global D * 2 bytes * (W-1)/W; the
official all-reduce of C moves 2 D^2 * 4 bytes * (W-1)/W. At N=2048, D=8192: 64 MiB vs
512 MiB.

    python benchmarks/bench_barlow_twins.py            # on a CUDA GPU
    python benchmarks/bench_barlow_twins.py --smoke    # tiny, on the CPU
"""

import torch

import fastssl
from fastssl.benchmark import Case, Contender, compiled, parse_args, run_benchmark, under_autocast
from fastssl.ops import barlow_twins_loss, vicreg_loss
from fastssl.reference.barlow_twins import barlow_twins_loss_original, vicreg_loss_original

SHAPES = [(256, 8192), (2048, 8192), (2048, 2048), (4096, 1024)]


def forward_backward(loss_fn, z1, z2):
    def step():
        z1.grad = z2.grad = None
        loss_fn(z1, z2).backward()
    return step


def make_cases(device, smoke, args):
    cases = []
    for name, ours, official in [("barlow_twins", barlow_twins_loss, barlow_twins_loss_original),
                                 ("vicreg", vicreg_loss, vicreg_loss_original)]:
        official_eager = under_autocast(official, device)
        official_compiled = compiled(official_eager, args)
        for N, D in SHAPES:
            if smoke:
                N, D = max(4, N // 128), max(8, D // 128)
            z1 = torch.randn(N, D, device=device).bfloat16().requires_grad_()
            z2 = (0.7 * z1.detach().float() + 0.5 * torch.randn(N, D, device=device)).bfloat16().requires_grad_()

            def fastssl_loss(a, b, ours=ours, matmul="triton"):
                with fastssl.use_backend("triton"):
                    return ours(a, b, matmul=matmul)

            contenders = [Contender("fastssl (triton)", forward_backward(fastssl_loss, z1, z2))]
            if N < D:  # the Gram form: its matmuls on cuBLAS instead of the fused kernel
                contenders.append(Contender("fastssl (triton, cuBLAS Gram)", forward_backward(
                    lambda a, b: fastssl_loss(a, b, matmul="cublas"), z1, z2)))
            contenders.append(Contender("official (eager, autocast)", forward_backward(official_eager, z1, z2)))
            if official_compiled is not None:
                contenders.append(Contender("official (torch.compile, autocast)",
                                            forward_backward(official_compiled, z1, z2)))
            cases.append(Case(f"{name} N={N} D={D} bf16", contenders,
                              min_flops=min(6 * N * N * D, 6 * N * D * D),
                              params={"loss": name, "N": N, "D": D, "dtype": "bfloat16",
                                      "formulation": "gram" if N < D else "cross"},
                              speedup_goals={"official (eager, autocast)": 3.0}
                              if (name, N, D) == ("barlow_twins", 2048, 8192) else {}))
    return cases


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("barlow_twins", args, make_cases)


if __name__ == "__main__":
    main()
