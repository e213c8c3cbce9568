"""The packed multi-crop ViT, forward + backward: fastssl.nn.PackedViT (one forward per block
over every crop, varlen attention) vs timm's forward once per resolution (SDPA), same model,
same crops, bf16 autocast.

Case (REFERENCE.md section 6): DINO ViT-S/16, B=64 images: 2 global crops of 224 px
(197 tokens) and 10 local crops of 96 px (37 tokens) each, i.e. 128 x 197 + 640 x 37 tokens.
FLOPs: the ViT's matmuls, 2 * params * tokens forward and twice that backward (6 * params *
tokens), plus the attention (FlashAttention's count, 3.5 * 4 * sum(n^2) * dim).

    python benchmarks/bench_packed_vit.py            # on a CUDA GPU
    python benchmarks/bench_packed_vit.py --smoke    # tiny, on the CPU (TRITON_INTERPRET=1)
"""

import torch
from timm.models.vision_transformer import VisionTransformer

import fastssl
from fastssl.benchmark import Case, Contender, parse_args, run_benchmark
from fastssl.nn import PackedViT

# (images, pixels) per crop group
DINO_CROPS = [(128, 224), (640, 96)]
SMOKE_CROPS = [(2, 32), (4, 16)]


def vit(smoke: bool, device) -> VisionTransformer:
    size = dict(embed_dim=128, depth=2, num_heads=2, patch_size=8, img_size=32) if smoke else \
        dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224)
    return VisionTransformer(num_classes=0, dynamic_img_size=True, **size).to(device)


def training_step(forward, model, crops, device):
    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features = forward(crops)
        sum(f[:, 0].float().square().mean() for f in features).backward()
    return run


def make_cases(device, smoke, args):
    model = vit(smoke, device).train()
    groups = SMOKE_CROPS if smoke else DINO_CROPS
    crops = [torch.randn(n, 3, px, px, device=device) for n, px in groups]
    packed = PackedViT(model)

    def packed_forward(images):
        with fastssl.use_backend("triton"):
            return packed(images)

    def per_resolution(images):
        return [model.forward_features(x) for x in images]

    patch = model.patch_embed.patch_size[0]
    lengths = [(n, (px // patch) ** 2 + model.num_prefix_tokens) for n, px in groups]
    tokens = sum(n * t for n, t in lengths)
    params = sum(p.numel() for p in model.blocks.parameters())
    attention = 4 * sum(n * t * t for n, t in lengths) * model.embed_dim * len(model.blocks)
    return [Case(
        f"ViT {'tiny' if smoke else 'S/16'} crops {groups}, fwd+bwd bf16",
        [Contender("fastssl PackedViT (varlen)", training_step(packed_forward, model, crops, device)),
         Contender("timm per resolution (SDPA)", training_step(per_resolution, model, crops, device))],
        min_flops=6 * params * tokens + int(3.5 * attention),
        params={"crops": groups, "tokens": tokens},
        # half the gain the step's composition allows: attention is 14% of the ViT's modeled
        # step at DINO's crops (benchmarks/results/model/plan.json), a bound of 1.16x
        speedup_goals={"timm per resolution (SDPA)": 1.08},
    )]


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("packed_vit", args, make_cases)


if __name__ == "__main__":
    main()
