"""Contrastive losses, forward + backward: fastssl's fused InfoNCE against the eager originals
and torch.compile of them, with peak memory.

Cases: SimCLR's NT-Xent at a global batch of 4096 (2N = 8192 rows) with D = 128 and 256
(lightly's NTXentLoss formula, the common implementation, as the original; both views against
every row of both), and MoCo v3's ``contrastive_loss(q1, k2) + contrastive_loss(q2, k1)`` at N =
4096 per view, D = 256 (keys without gradient); the originals under bf16 autocast. Minimal FLOPs and bytes:
:func:`fastssl.ops.info_nce.info_nce_flops` / ``info_nce_bytes`` (the similarities computed in
the forward and recomputed in the backward for each side that takes a gradient). Goals: at least
3x eager forward + backward, and at most 1/10 of its peak memory.

    python benchmarks/bench_info_nce.py            # on a CUDA GPU
    python benchmarks/bench_info_nce.py --smoke    # tiny, on the CPU (TRITON_INTERPRET=1)
"""

import functools

import torch

import fastssl
from fastssl.benchmark import Case, Contender, compiled, parse_args, run_benchmark, under_autocast
from fastssl.nn import InfoNCELoss, NTXentLoss
from fastssl.ops.info_nce import info_nce_bytes, info_nce_flops
from fastssl.reference.info_nce import moco_v3_contrastive_loss_original, ntxent_loss_original

GOALS = dict(speedup_goals={"original (eager)": 3.0}, memory_goals={"original (eager)": 10.0})
DTYPE = torch.bfloat16


def forward_backward(loss_fn, *leaves):
    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_fn(*leaves).backward()
    return step


def with_triton(module):
    def run(*rows):
        with fastssl.use_backend("triton"):
            return module(*rows)
    return run


def simclr_case(device, smoke, args, D):
    N = 16 if smoke else 4096  # images per step: 2N rows
    z1, z2 = (torch.randn(N, D, device=device, dtype=DTYPE).requires_grad_() for _ in range(2))
    original = under_autocast(lambda a, b: ntxent_loss_original(a, b, 0.5), device)
    contenders = [Contender("fastssl (triton)", forward_backward(with_triton(NTXentLoss(0.5)), z1, z2)),
                  Contender("original (eager)", forward_backward(original, z1, z2))]
    original_compiled = compiled(original, args)
    if original_compiled is not None:
        contenders.append(Contender("original (torch.compile)", forward_backward(original_compiled, z1, z2)))
    # Both directions, each against both key sets (the other view and the own view).
    return Case(f"SimCLR NT-Xent 2N={2 * N} D={D} bf16", contenders,
                min_bytes=2 * info_nce_bytes(N, N, D, DTYPE, key_sets=2),
                min_flops=2 * info_nce_flops(N, N, D, key_sets=2),
                params={"N": N, "D": D, "dtype": str(DTYPE)}, **GOALS)


def moco_case(device, smoke, args):
    N, D = (16, 32) if smoke else (4096, 256)
    q1, q2 = (torch.randn(N, D, device=device, dtype=DTYPE).requires_grad_() for _ in range(2))
    k1, k2 = (torch.randn(N, D, device=device, dtype=DTYPE) for _ in range(2))
    ours = InfoNCELoss(0.2)

    def fastssl_loss(a, b):
        with fastssl.use_backend("triton"):
            return ours(a, k2) + ours(b, k1)

    @functools.partial(under_autocast, device=device)
    def original(a, b):
        return moco_v3_contrastive_loss_original(a, k2, 0.2) + moco_v3_contrastive_loss_original(b, k1, 0.2)

    contenders = [Contender("fastssl (triton)", forward_backward(fastssl_loss, q1, q2)),
                  Contender("original (eager)", forward_backward(original, q1, q2))]
    original_compiled = compiled(original, args)
    if original_compiled is not None:
        contenders.append(Contender("original (torch.compile)", forward_backward(original_compiled, q1, q2)))
    return Case(f"MoCo v3 N={N} D={D} bf16, two views", contenders,
                min_bytes=2 * info_nce_bytes(N, N, D, DTYPE, key_gradients=False),
                min_flops=2 * info_nce_flops(N, N, D, key_gradients=False),
                params={"N": N, "D": D, "dtype": str(DTYPE)}, **GOALS)


def make_cases(device, smoke, args):
    return [simclr_case(device, smoke, args, 128), simclr_case(device, smoke, args, 256),
            moco_case(device, smoke, args)]


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("info_nce", args, make_cases)


if __name__ == "__main__":
    main()
