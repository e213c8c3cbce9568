"""DINO / DINOv2 / iBOT losses, forward + backward: fastssl's fused kernel vs the official
PyTorch code, eager and compiled.

Cases (REFERENCE.md section 1): DINO ViT-S/16 (B=64, 2+10 crops, K=65536), DINOv2 ViT-L
(B=32, 2+8 crops, K=131072), iBOT (1000 masked patches, K=131072, teacher logits centered
in the kernel vs DINOv2's softmax_center_teacher + forward_masked), and the head's last
layer fused with the loss (DINO ViT-S, bottleneck 256) vs last layer + official loss.
Minimal traffic of one loss forward + backward: every logit read twice and the student
gradient written once (for the fused head: the weights and features instead).

    python benchmarks/bench_dino_loss.py            # on a CUDA GPU
    python benchmarks/bench_dino_loss.py --smoke    # tiny, on the CPU
"""

import torch

import fastssl
from fastssl.benchmark import Case, Contender, compiled, parse_args, run_benchmark
from fastssl.nn import DINOHead, DINOHeadLoss, DINOLoss, IBOTPatchLoss
from fastssl.ops.dino_loss import dino_cross_entropy_bytes
from fastssl.reference.dino import DINOLossOriginal, ibot_patch_loss_original

# name, images per GPU, crops, K, dtype
DINO_RECIPES = [
    ("DINO ViT-S/16 B=64 2+10 crops K=65536 fp32", 64, 12, 65536, torch.float32),
    ("DINO ViT-S/16 B=64 2+10 crops K=65536 bf16", 64, 12, 65536, torch.bfloat16),
    ("DINOv2 ViT-L B=32 2+8 crops K=131072 bf16", 32, 10, 131072, torch.bfloat16),
]
IBOT_RECIPE = ("iBOT 1000 masked patches K=131072 bf16", 1000, 131072, torch.bfloat16)
# The README's goals for the loss, forward + backward.
LOSS_GOALS = dict(speedup_goals={"official (eager)": 4.0, "official (torch.compile)": 2.0},
                  memory_goals={"official (eager)": 4.0})


def forward_backward(loss_fn, student, *args):
    def step():
        student.grad = None
        loss_fn(student, *args).backward()
    return step


def dino_case(device, smoke, args, name, B, ncrops, K, dtype):
    if smoke:
        B, K = 2, K // 256
    student = (torch.randn(ncrops * B, K, device=device) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(2 * B, K, device=device) * 3).to(dtype)
    ours = DINOLoss(K, ncrops, 0.04, 0.07, 30, 100).to(device)
    official = DINOLossOriginal(K, ncrops, 0.04, 0.07, 30, 100).to(device)

    def fastssl_loss(s, t):
        with fastssl.use_backend("triton"):
            return ours(s, t, 10)

    contenders = [
        Contender("fastssl (triton)", forward_backward(fastssl_loss, student, teacher)),
        Contender("official (eager)", forward_backward(lambda s, t: official(s, t, 10), student, teacher)),
    ]
    official_compiled = compiled(official, args)
    if official_compiled is not None:
        contenders.append(Contender("official (torch.compile)",
                                    forward_backward(lambda s, t: official_compiled(s, t, 10), student, teacher)))
    rows = (ncrops + 2) * B
    return Case(name, contenders, min_bytes=dino_cross_entropy_bytes(rows, ncrops * B, K, dtype),
                params={"B": B, "ncrops": ncrops, "K": K, "dtype": str(dtype)}, **LOSS_GOALS)


def ibot_case(device, smoke, args):
    name, n_masked, K, dtype = IBOT_RECIPE
    if smoke:
        n_masked, K = 16, K // 256
    n_images = 64
    masks = torch.zeros(n_images, 196, dtype=torch.bool, device=device)
    masks.view(-1)[torch.randperm(n_images * 196, device=device)[:n_masked]] = True
    student = (torch.randn(n_masked, K, device=device) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(n_masked, K, device=device) * 3).to(dtype)
    ours, theirs = IBOTPatchLoss(K).to(device), IBOTPatchLoss(K).to(device)

    def fastssl_loss(s, t):
        with fastssl.use_backend("triton"):
            return ours.forward_masked(s, t, masks, teacher_temp=0.07)

    def official_loss(s, t):
        probs = theirs.softmax_center_teacher(t, 0.07)
        theirs.update_center(t)
        return ibot_patch_loss_original(s, probs, masks)

    contenders = [
        Contender("fastssl (triton)", forward_backward(fastssl_loss, student, teacher)),
        Contender("official (eager)", forward_backward(official_loss, student, teacher)),
    ]
    official_compiled = compiled(official_loss, args)
    if official_compiled is not None:
        contenders.append(Contender("official (torch.compile)", forward_backward(official_compiled, student, teacher)))
    return Case(name, contenders, min_bytes=dino_cross_entropy_bytes(2 * n_masked, n_masked, K, dtype),
                params={"masked_patches": n_masked, "K": K, "dtype": str(dtype)}, **LOSS_GOALS)


def head_case(device, smoke, args):
    B, ncrops, K, D, dtype = 64, 12, 65536, 256, torch.bfloat16
    if smoke:
        B, K = 2, K // 256
    student_head = DINOHead(384, K, norm_last_layer=False).to(device)
    teacher_head = DINOHead(384, K).to(device)
    features = torch.nn.functional.normalize(torch.randn(ncrops * B, D, device=device), dim=-1)
    features = features.to(dtype).requires_grad_()
    teacher_features = torch.nn.functional.normalize(torch.randn(2 * B, D, device=device), dim=-1).to(dtype)
    fused = DINOHeadLoss(K, ncrops, 0.04, 0.07, 30, 100).to(device)
    official = DINOLossOriginal(K, ncrops, 0.04, 0.07, 30, 100).to(device)

    def fastssl_loss(h, t):
        with fastssl.use_backend("triton"):
            return fused(h, student_head.last_layer.weight.to(dtype), t, teacher_head.last_layer.weight.to(dtype), 10)

    def unfused_loss(h, t):
        student_logits = h @ student_head.last_layer.weight.to(dtype).t()
        with torch.no_grad():
            teacher_logits = t @ teacher_head.last_layer.weight.to(dtype).t()
        return official(student_logits, teacher_logits, 10)

    contenders = [
        Contender("fastssl fused head+loss (triton)", forward_backward(fastssl_loss, features, teacher_features)),
        Contender("last layer + official loss (eager)", forward_backward(unfused_loss, features, teacher_features)),
    ]
    unfused_compiled = compiled(unfused_loss, args)
    if unfused_compiled is not None:
        contenders.append(Contender("last layer + official loss (torch.compile)",
                                    forward_backward(unfused_compiled, features, teacher_features)))
    matmul_flops = 2 * (ncrops + 2) * B * D * K
    return Case(f"DINO ViT-S head 256->{K} + loss, B={B} 2+10 crops bf16", contenders,
                min_flops=3 * matmul_flops,
                params={"B": B, "ncrops": ncrops, "K": K, "D": D, "dtype": str(dtype)})


def make_cases(device, smoke, args):
    cases = [dino_case(device, smoke, args, *recipe) for recipe in DINO_RECIPES]
    return cases + [ibot_case(device, smoke, args), head_case(device, smoke, args)]


def main():
    args = parse_args(__doc__.splitlines()[0])
    run_benchmark("dino_loss", args, make_cases)


if __name__ == "__main__":
    main()
