"""SwAV-style Sinkhorn targets with fastssl, next to the original code.

Runs anywhere (CPU or GPU): prototype scores of a small batch, balanced assignments from
fastssl.ops.sinkhorn_knopp, the same from SwAV's original function, and a case where the
original overflows (scores / eps > 88 in float32) while fastssl stays exact.

    python examples/sinkhorn_swav.py
"""

import torch
import torch.nn.functional as F

import fastssl
from fastssl.nn import SwAVLoss
from fastssl.ops import sinkhorn_knopp
from fastssl.reference import sinkhorn_knopp_original


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    batch, dim, n_prototypes = 256, 128, 3000
    embeddings = F.normalize(torch.randn(batch, dim, device=device), dim=1)
    prototypes = F.normalize(torch.randn(n_prototypes, dim, device=device), dim=1)
    scores = embeddings @ prototypes.t()

    q = sinkhorn_knopp(scores, eps=0.05, n_iters=3)
    q_original = sinkhorn_knopp_original(scores, eps=0.05, n_iters=3)
    print(f"device {device}, backends {fastssl.available_backends(device)}")
    print(f"Q {tuple(q.shape)} {q.dtype}: rows sum to {q.sum(1).mean().item():.6f}, "
          f"prototype mass {q.sum(0).min().item():.4f}..{q.sum(0).max().item():.4f} "
          f"(ideal {batch / n_prototypes:.4f})")
    print(f"max |fastssl - original| = {(q - q_original).abs().max().item():.2e}")

    sharp = scores * 50  # scores / eps up to 1000: exp overflows in the original
    original_finite = torch.isfinite(sinkhorn_knopp_original(sharp, 0.05, 3)).all().item()
    fastssl_finite = torch.isfinite(sinkhorn_knopp(sharp, 0.05, 3)).all().item()
    print(f"scores x50: original finite: {original_finite}, fastssl finite: {fastssl_finite}")

    crops = [scores + 0.1 * torch.randn_like(scores) for _ in range(4)]
    print(f"SwAV loss over 4 crops: {SwAVLoss()(crops).item():.4f}")


if __name__ == "__main__":
    main()
