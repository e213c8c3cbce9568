"""Triton helpers shared by the ops' kernels and launchers."""

import torch
import triton
import triton.language as tl

from fastssl.devices import target_of


def programs_per_wave(device: torch.device, elsewhere: int) -> int:
    """How many programs a launch that splits its work freely should aim for: four per SM
    (a few waves) on a GPU and on meta tensors (``fastssl plan``: the planned GPU's, see
    :func:`fastssl.devices.target_of`), ``elsewhere`` under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta":
        return 4 * target_of(device).multiprocessors
    return elsewhere


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation: 16-bit operands on the matrix units, float32
    ones in full precision ("ieee": no TF32, as torch's default matmul; the precision
    setting concerns float32 operands only, and AMD's CDNA2 refuses "tf32"). UPCAST (the
    Triton interpreter only, whose dot mishandles bfloat16): multiply exact float32 copies
    instead, which gives the same exact products a GPU's matrix units accumulate."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")
