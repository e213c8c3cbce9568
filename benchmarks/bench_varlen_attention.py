"""Multi-crop packed attention, forward and forward + backward: fastssl's varlen kernels vs
SDPA per resolution group, SDPA on jagged nested tensors, FlexAttention with a document
mask, torch.nn.attention.varlen (where present), xformers' memory_efficient_attention with
a BlockDiagonalMask (what DINOv2 and NeCo run; reported as not run where xformers is not
installed). SDPA per resolution group is the original methods' own path (timm's attention
on each crop resolution); fastssl's per-sequence reference is a test oracle, not a contender.

Cases (REFERENCE.md section 6), bf16, head_dim 64, all crops of one step packed:
DINO ViT-S/16 (B=64: 128 x 197 + 640 x 37 tokens, 6 heads), DINOv2 ViT-L/14 (B=32:
64 x 257 + 256 x 50, 16 heads), NeCo ViT-S/14 (B=64: 128 x 1370 + 256 x 50, 6 heads).
FLOPs as FlashAttention counts them: forward 4 * sum(n_i^2) * heads * head_dim, backward
2.5x that; the % column is against the measured bf16 matmul ceiling. Minimal bytes: Q, K,
V read and O written once (the backward: Q, K, V, O, dO read, dQ, dK, dV written).

    python benchmarks/bench_varlen_attention.py            # on a CUDA GPU
    python benchmarks/bench_varlen_attention.py --smoke    # tiny, on the CPU (TRITON_INTERPRET=1)
"""

import math

import torch
import torch.nn.functional as F

import fastssl
from fastssl.benchmark import BEST_OTHER, Case, Contender, parse_args, run_benchmark
from fastssl.ops import varlen_attention

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch
    varlen_attn = None

# name, [(sequences, tokens)], heads, the README's goal: times faster than the best contender
RECIPES = [
    ("DINO ViT-S/16 B=64: 128x197 + 640x37, 6 heads", [(128, 197), (640, 37)], 6, 1.3),
    ("DINOv2 ViT-L/14 B=32: 64x257 + 256x50, 16 heads", [(64, 257), (256, 50)], 16, 1.3),
    ("NeCo ViT-S/14 B=64: 128x1370 + 256x50, 6 heads", [(128, 1370), (256, 50)], 6, 0.9),
]
SMOKE_GROUPS = [(2, 20), (3, 9)]
HEAD_DIM = 64
DTYPE = torch.bfloat16


def fastssl_attention(q, k, v, cu_seqlens, max_seqlen, groups):
    with fastssl.use_backend("triton"):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen)


def sdpa_per_group(q, k, v, cu_seqlens, max_seqlen, groups):
    """DINOv2 without the packing: one SDPA call per resolution group (best backend)."""
    outs, first = [], 0
    for count, length in groups:
        tokens = slice(first, first + count * length)
        first += count * length
        view = lambda x: x[tokens].unflatten(0, (count, length)).transpose(1, 2)  # noqa: E731
        outs.append(F.scaled_dot_product_attention(view(q), view(k), view(v)).transpose(1, 2).flatten(0, 1))
    return torch.cat(outs)


def sdpa_nested(q, k, v, cu_seqlens, max_seqlen, groups):
    offsets = cu_seqlens.long()
    nested = [torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=max_seqlen).transpose(1, 2)
              for x in (q, k, v)]
    return F.scaled_dot_product_attention(*nested).transpose(1, 2).values()


def make_flex(device, args):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = flex_attention if args.smoke or args.no_compile else torch.compile(flex_attention)

    def prepare(cu_seqlens, total):
        document = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=device),
                                           (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total)

        def same_document(b, h, q_idx, kv_idx):
            return document[q_idx] == document[kv_idx]

        return create_block_mask(same_document, None, None, total, total, device=str(device))

    def run(q, k, v, cu_seqlens, max_seqlen, groups, block_mask):
        layout = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  (1, H, T, D)
        return flex(layout(q), layout(k), layout(v), block_mask=block_mask)[0].transpose(0, 1)

    return prepare, run


def xformers_block_diagonal(lengths):
    """What DINOv2 and NeCo run today: xformers' memory_efficient_attention over the packed
    tokens with a BlockDiagonalMask (built once, as their attention-bias cache does). Where
    xformers is not installed the contender raises, and the table says why."""
    try:
        from xformers.ops import fmha
    except ImportError as error:
        reason = f"xformers is not installed ({error})"

        def unavailable(*args):
            raise RuntimeError(reason)
        return unavailable
    bias = fmha.BlockDiagonalMask.from_seqlens(lengths)

    def run(q, k, v, cu_seqlens, max_seqlen, groups):
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    return run


def torch_varlen(q, k, v, cu_seqlens, max_seqlen, groups):
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def step(fn, inputs, backward):
    qkv, grad_out, extra = inputs

    def run():
        source = qkv if backward else qkv.detach()
        q, k, v = source.unflatten(1, (3, -1, HEAD_DIM)).unbind(1)  # views of a fused projection
        out = fn(q, k, v, *extra)
        if backward:
            qkv.grad = None
            out.backward(grad_out)
        return out
    return run


def make_cases(device, smoke, args):
    prepare_flex, run_flex = make_flex(device, args)
    cases = []
    for name, groups, heads, goal in RECIPES[:1] if smoke else RECIPES:
        if smoke:  # one tiny case: the interpreter is slow, and the numbers mean nothing
            name, groups, heads = f"smoke {SMOKE_GROUPS}", SMOKE_GROUPS, 2
        lengths = [length for count, length in groups for _ in range(count)]
        total, max_seqlen = sum(lengths), max(lengths)
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        qkv = (torch.randn(total, 3 * heads * HEAD_DIM, device=device) / math.sqrt(2)).to(DTYPE).requires_grad_()
        grad_out = torch.randn(total, heads, HEAD_DIM, device=device).to(DTYPE)
        extra = (cu_seqlens, max_seqlen, groups)
        contenders = [
            ("fastssl varlen (triton)", fastssl_attention),
            ("SDPA per resolution group", sdpa_per_group),
            ("SDPA on jagged nested tensors", sdpa_nested),
        ]
        try:
            block_mask = prepare_flex(cu_seqlens, total)
            contenders.append(("FlexAttention, document mask",
                               lambda *a, mask=block_mask: run_flex(*a, mask)))
        except Exception as error:  # reported in the log, the other contenders still run
            print(f"FlexAttention unavailable: {type(error).__name__}: {error}"[:200])
        if varlen_attn is not None:
            contenders.append(("torch.nn.attention.varlen", torch_varlen))
        contenders.append(("xformers memory_efficient_attention, BlockDiagonalMask", xformers_block_diagonal(lengths)))

        forward_flops = 4 * sum(n * n for n in lengths) * heads * HEAD_DIM
        element = torch.empty((), dtype=DTYPE).element_size()
        tensor_bytes = total * heads * HEAD_DIM * element
        params = {"groups": groups, "heads": heads, "head_dim": HEAD_DIM, "dtype": str(DTYPE),
                  "tokens": total, "max_seqlen": max_seqlen}
        for backward in (False, True):
            runs = [Contender(label, step(fn, (qkv, grad_out, extra), backward)) for label, fn in contenders]
            cases.append(Case(
                f"{name}, {'fwd+bwd' if backward else 'fwd'}", runs,
                min_bytes=(12 if backward else 4) * tensor_bytes,
                min_flops=int(forward_flops * (3.5 if backward else 1.0)),
                params={**params, "backward": backward}, speedup_goals={BEST_OTHER: goal},
            ))
    return cases


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("varlen_attention", args, make_cases)


if __name__ == "__main__":
    main()
