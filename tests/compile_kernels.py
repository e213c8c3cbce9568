"""Compile every Triton kernel configuration the launchers use, for sm_80 and sm_90, on a
machine without a GPU.

The Triton interpreter checks what the kernels compute, not that they compile for a GPU.
This script runs the real launchers on small CPU tensors with ``JITFunction.run`` replaced:
instead of launching, each call's signature is built from its arguments and compiled
ahead of time (Triton bundles ptxas) for both targets. Run it without TRITON_INTERPRET:

    python tests/compile_kernels.py
"""

import importlib
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                 torch.int32: "*i32", torch.int64: "*i64"}
compiled = []


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


def compile_instead_of_launch(self, *args, grid, warmup=False, **kwargs):
    signature, constants = _signature(self, args, kwargs)
    options = {name: value for name, value in kwargs.items() if name not in self.arg_names}
    key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constants.items())), tuple(options.items()))
    if key in {entry[0] for entry in compiled}:
        return
    for target in TARGETS:
        kernel = triton.compile(ASTSource(self, signature, constants), target=target, options=options)
        compiled.append((key, target.arch, kernel.metadata.shared))


def run_launchers():
    from fastssl.ops import barlow_twins, dino_loss, sinkhorn
    from fastssl.ops.dino_loss import dino_pair_weights

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in [(6, 196, 3), (1, 4096, 3000), (1, 128, 65536), (1, 25088, 200)]:
            sinkhorn._sinkhorn_triton(torch.zeros(shape, dtype=dtype), 0.05, 3, None)
        for S, T, B, K, teacher_temp in [(10, 2, 4, 65536, 0.04), (1, 1, 8, 1000, None), (8, 2, 2, 131072, 0.07)]:
            student, teacher = torch.zeros(S * B, K, dtype=dtype), torch.zeros(T * B, K, dtype=dtype)
            center = torch.zeros(K) if teacher_temp else None
            pairs, weights = dino_pair_weights(T, S) if S > 1 else torch.ones(1, 1), torch.ones(B)
            dino_loss._forward_partials(student, teacher, center, S, T, 0.1, teacher_temp)
            stats_s, stats_t = torch.zeros(B, S, 2), torch.zeros(B, T, 3)
            dino_loss._dino_backward_triton(torch.ones(()), student, teacher, center, stats_s, stats_t,
                                            pairs, weights, S, T, 0.1, teacher_temp)
        N, D = 256, 8192
        z, stats, ones = torch.zeros(N, D, dtype=dtype), torch.zeros(D), torch.ones(1)
        barlow_twins.standardize_pair(z, z, stats, stats, stats, stats)
        zn = torch.zeros(N, D)
        for rstd in (stats, None):  # Barlow Twins' standardization, VICReg's centering
            barlow_twins.standardize_backward(z, zn, zn, stats, rstd, 1e-3, N, ones, 2, None, dtype)
        for symmetric in (True, False):
            barlow_twins.gram_pair(z, z, z, z, symmetric=symmetric)
            barlow_twins.gram_pair(z, z, symmetric=symmetric)
        for reduce in (True, False):
            barlow_twins.cross_correlation(torch.zeros(1024, 512, dtype=dtype), torch.zeros(1024, 512, dtype=dtype),
                                           1e-3, reduce)

    varlen_attention = importlib.import_module("fastssl.ops.varlen_attention")  # fastssl.ops exports the function
    cu_seqlens = torch.tensor([0, 37, 234, 1604], dtype=torch.int32)  # one sequence per length class
    for dtype in (torch.bfloat16, torch.float32):
        # float16 compiles to bfloat16's code with another element type; float32 differs in its dots.
        for head_dim in varlen_attention.SUPPORTED_HEAD_DIMS if dtype == torch.bfloat16 else (64,):
            q, k, v = torch.zeros(1604, 3, 6, head_dim, dtype=dtype).unbind(1)
            out, lse = varlen_attention._forward_triton(q, k, v, cu_seqlens, 0, 0.125)
            for deterministic in (False, True):
                varlen_attention._backward_triton(out, q, k, v, out, lse, cu_seqlens, 0, 0.125, deterministic)

    soft_sort = importlib.import_module("fastssl.ops.soft_sort")  # fastssl.ops exports the functions
    neco_loss = importlib.import_module("fastssl.ops.neco_loss")
    # The network is a runtime table: only dtype, padded size and distribution make variants.
    configs = [(torch.float32, 49, d) for d in soft_sort.DISTRIBUTIONS] + [
        (torch.bfloat16, 49, "cauchy"), (torch.float16, 49, "cauchy"), (torch.float32, 2, "cauchy"),
        (torch.float32, 256, "cauchy")]
    for dtype, n, distribution in configs:
        x = torch.zeros(3, n, dtype=dtype)
        soft_sort._soft_sort_forward_triton(x, 10.0, "bitonic", distribution, 0.25)
        soft_sort.soft_sort_backward_triton(x, x, torch.zeros(3, n, n, dtype=dtype), 10.0, "bitonic", distribution,
                                            0.25)
        if n == 49 and distribution == "cauchy" and dtype != torch.float16:
            neco_loss._neco_rows_triton(x, x, 100.0, 100.0, "bitonic", distribution, 0.25)
            soft_sort.soft_sort_backward_triton(x, None, None, 100.0, "bitonic", distribution, 0.25, teacher=x,
                                                grad_rows=torch.ones(3), teacher_steepness=100.0)

def main() -> int:
    JITFunction.run = compile_instead_of_launch
    run_launchers()
    kernels = sorted({entry[0][0] for entry in compiled})
    print(f"compiled {len(compiled)} kernel binaries ({len(compiled) // len(TARGETS)} configurations of "
          f"{len(kernels)} kernels) for sm_80 and sm_90: {', '.join(kernels)}")
    largest = max(compiled, key=lambda entry: entry[2])
    print(f"largest shared memory: {largest[2]} bytes ({largest[0][0]}, sm_{largest[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
