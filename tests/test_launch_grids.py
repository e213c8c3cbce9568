"""Every Triton launcher's grid stays within the GPUs' launch limits at the recipes' largest
sizes and at 10x them.

A grid axis past its limit fails at launch on a GPU (Triton hands the grid to the driver
unclamped) and never under the interpreter, which loops over any grid. The limits: CUDA
takes up to 2^31 - 1 programs on axis 0 and 65,535 on axes 1 and 2; HIP takes fewer than
2^32 work-items per axis (programs x warps x 64 lanes on AMD's CDNA GPUs). The launchers run
here on fake CUDA tensors (no memory, no GPU) with every kernel launch recorded instead of
run; the device reports 304 multiprocessors, the most of any target (MI300X's compute units),
so the launchers that size their grids by the device ask for the most programs they can.
"""

import importlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.interpreter import InterpretedFunction

from fastssl.ops import barlow_twins, dino_loss, sinkhorn

# fastssl.ops exports functions of these modules' names
info_nce, neco_loss, soft_sort, varlen_attention = (
    importlib.import_module(f"fastssl.ops.{name}")
    for name in ("info_nce", "neco_loss", "soft_sort", "varlen_attention"))

CUDA_AXIS_LIMITS = (2**31 - 1, 65535, 65535)
HIP_WORK_ITEMS = 2**32
AMD_WAVEFRONT = 64
MULTIPROCESSORS = 304


@pytest.fixture
def launches(monkeypatch):
    """Runs the body on fake CUDA tensors and records (kernel, grid, num_warps) per launch."""
    records = []

    def record(self, *args, grid, warmup=False, **kwargs):
        grid = tuple(grid(kwargs) if callable(grid) else grid) + (1, 1)
        records.append((self.fn.__name__, grid[:3], kwargs.get("num_warps", 4)))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    # Launchers that skip their kernels on fake tensors (memory planning) launch them here.
    monkeypatch.setattr(barlow_twins, "has_data", lambda tensor: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(multi_processor_count=MULTIPROCESSORS))
    with FakeTensorMode():
        yield records


def assert_within_limits(records):
    assert records, "no kernel was launched"
    for kernel, grid, num_warps in records:
        for axis, (size, limit) in enumerate(zip(grid, CUDA_AXIS_LIMITS)):
            assert 1 <= size <= limit, f"{kernel}: grid axis {axis} is {size}, over CUDA's {limit}"
            work_items = size * num_warps * AMD_WAVEFRONT
            assert work_items < HIP_WORK_ITEMS, f"{kernel}: grid axis {axis} is {work_items:,} work-items on HIP"


def cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="cuda")


SCALES = [pytest.param(1, id="recipe"), pytest.param(10, id="10x")]

# Per image, the crops' token counts; the number of images in one call at which the old
# (heads, tiles) grids passed 65,535 tiles on axis 1.
ATTENTION_LAYOUTS = {
    "DINO 2x197+10x37": ([197] * 2 + [37] * 10, 2738),
    "DINOv2 2x257+8x50": ([257] * 2 + [50] * 8, 2699),
    "NeCo 2x1370+4x50": ([1370] * 2 + [50] * 4, 2925),
}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", list(ATTENTION_LAYOUTS))
def test_varlen_attention(launches, layout, scale):
    crops, images = ATTENTION_LAYOUTS[layout]
    n_seqs, T, H = len(crops) * images * scale, sum(crops) * images * scale, 6
    q, k, v, out = (cuda(T, H, 64) for _ in range(4))
    cu_seqlens, lse = cuda(n_seqs + 1, dtype=torch.int32), cuda(H, T, dtype=torch.float32)
    for max_seqlen in (0, max(crops)):
        varlen_attention._forward_triton(q, k, v, cu_seqlens, max_seqlen, 0.125)
        for deterministic in (False, True):
            varlen_attention._backward_triton(out, q, k, v, out, lse, cu_seqlens, max_seqlen, 0.125, deterministic)
    assert_within_limits(launches)


# (student crops, teacher crops, images or masked patches, K): DINO ViT-S/16, DINOv2 ViT-L,
# and iBOT's masked patches at DINOv2's 518-px stage (64 images x 2 crops x 1369 x 0.5).
DINO_SHAPES = {"DINO": (10, 2, 64, 65536), "DINOv2": (8, 2, 32, 131072), "iBOT 518 px": (1, 1, 87616, 131072)}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("recipe", list(DINO_SHAPES))
def test_dino_cross_entropy(launches, recipe, scale):
    """Also the launches of ``dino_head_cross_entropy``, which calls these per K slice."""
    S, T, B, K = DINO_SHAPES[recipe]
    B *= scale
    student, teacher, center = cuda(S * B, K), cuda(T * B, K), cuda(K, dtype=torch.float32)
    dino_loss._forward_partials(student, teacher, center, S, T, 0.1, 0.04)
    stats_s, stats_t = cuda(B, S, 2, dtype=torch.float32), cuda(B, T, 3, dtype=torch.float32)
    pairs, weights, grad = (cuda(T, S, dtype=torch.float32), cuda(B, dtype=torch.float32),
                            cuda(dtype=torch.float32))
    dino_loss._dino_backward_triton(grad, student, teacher, center, stats_s, stats_t, pairs, weights, S, T, 0.1, 0.04)
    assert_within_limits(launches)


# (problems, B, K): SwAV's batch with its queue, iBOT's masked patches against 131,072
# prototypes, Time-Tuning's patches, DoRA's batched problems.
SINKHORN_SHAPES = {"SwAV": (1, 4096 + 3840, 3000), "iBOT 518 px": (1, 87616, 131072),
                   "Time-Tuning": (1, 25088, 200), "DoRA": (64, 196, 3)}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("recipe", list(SINKHORN_SHAPES))
def test_sinkhorn_knopp(launches, recipe, scale):
    problems, B, K = SINKHORN_SHAPES[recipe]
    if problems > 1:
        problems *= scale
    else:
        B *= scale
    sinkhorn._sinkhorn_triton(cuda(problems, B, K), 0.05, 3, None)
    assert_within_limits(launches)


@pytest.mark.parametrize("scale", SCALES)
def test_barlow_twins_and_vicreg(launches, scale):
    N, D = 2048 * scale, 8192
    z, zn, stats = cuda(N, D), cuda(N, D, dtype=torch.float32), cuda(D, dtype=torch.float32)
    barlow_twins.standardize_pair(z, z, stats, stats, stats, stats)
    for rstd in (stats, None):
        barlow_twins.standardize_backward(zn, zn, zn, stats, rstd, 1e-3, N, cuda(1, dtype=torch.float32), 1, None,
                                          torch.bfloat16)
    barlow_twins.gram_pair(z, z, z, z, symmetric=True)
    barlow_twins.cross_correlation(z, z, 1.0 / N, reduce=True)
    assert_within_limits(launches)


@pytest.mark.parametrize("scale", SCALES)
def test_info_nce(launches, scale):
    rows = cuda(8192 * scale, 256)
    lse, _ = info_nce._forward_triton(rows, rows, rows, 0.1, 0)
    info_nce._backward_triton(cuda(dtype=torch.float32), rows, rows, rows, lse, 0.1, 0, True, True)
    assert_within_limits(launches)


@pytest.mark.parametrize("scale", SCALES)
def test_soft_sort_and_neco_loss(launches, scale):
    """NeCo's step: 10 crop pairs x 64 images x 49 references, rows of 49."""
    x = cuda(10 * 64 * 49 * scale, 49)
    soft_sort._soft_sort_forward_triton(x, 100.0, "bitonic", "cauchy", 0.25)
    soft_sort.soft_sort_backward_triton(x, x, cuda(x.shape[0], 49, 49), 100.0, "bitonic", "cauchy", 0.25)
    neco_loss._neco_rows_triton(x, x, 100.0, 100.0, "bitonic", "cauchy", 0.25)
    assert_within_limits(launches)
