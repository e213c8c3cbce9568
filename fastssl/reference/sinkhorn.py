"""Sinkhorn-Knopp equipartition, in plain PyTorch.

Two functions with one meaning (REFERENCE.md section 2):

- :func:`sinkhorn_knopp_original` is SwAV's ``distributed_sinkhorn`` (identical to DINOv2's
  ``sinkhorn_knopp_teacher``) operation for operation. It is the test oracle and the
  benchmark baseline. Like the original it overflows once ``scores / eps`` exceeds about 88
  in float32 (709 in float64).
- :func:`sinkhorn_knopp_log_domain` computes the same function in the log domain, finite for
  any finite input. It is the ``reference`` backend of :func:`fastssl.ops.sinkhorn_knopp` and
  the algorithm the Triton kernels implement.

Why the log-domain form is the same function. Write ``A = exp(S / eps)`` with ``S`` of shape
(B, K). The original keeps ``Q = A * u[k] * v[b]`` implicitly and alternates
``u[k] = 1 / (K * sum_b A[b,k] v[b])`` (prototypes) and ``v[b] = 1 / (B * sum_k A[b,k] u[k])``
(samples), then returns ``B * Q``, whose rows sum to one. The constants ``K``, ``B`` and the
initial division by the total only rescale ``u`` or ``v`` by a constant that the next
normalization removes, so in exact arithmetic the output is

    lse_k = logsumexp_b(S[b,k] / eps - lse_b[b])       (lse_b starts at 0)
    lse_b = logsumexp_k(S[b,k] / eps - lse_k[k])       (repeated n_iters times)
    Q[b,k] = exp(S[b,k] / eps - lse_k[k] - lse_b[b])

Only ``lse_k`` needs a reduction across ranks (the batch is split, the prototypes are not).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastssl.distributed import ProcessGroup, all_reduce_logsumexp


@torch.no_grad()
def sinkhorn_knopp_original(
    scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, group: ProcessGroup = None
) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` in the dtype of ``scores``, batched over leading dims.

    ``scores`` (..., B_local, K); ``group`` is the process group to all-reduce over
    (``None``: no communication). For one (B, K) problem these are SwAV's operations
    exactly; leading dimensions are independent problems (DoRA's batched use).
    Returns Q of shape (..., B_local, K), rows summing to one.
    """
    world_size = 1 if group is None else dist.get_world_size(group)
    Q = torch.exp(scores / eps).transpose(-2, -1)  # (..., K, B_local)
    B = Q.shape[-1] * world_size
    K = Q.shape[-2]

    sum_Q = torch.sum(Q, dim=(-2, -1), keepdim=True)
    if group is not None:
        dist.all_reduce(sum_Q, group=group)
    Q /= sum_Q

    for _ in range(n_iters):
        sum_of_rows = torch.sum(Q, dim=-1, keepdim=True)
        if group is not None:
            dist.all_reduce(sum_of_rows, group=group)
        Q /= sum_of_rows
        Q /= K

        Q /= torch.sum(Q, dim=-2, keepdim=True)
        Q /= B

    Q *= B
    return Q.transpose(-2, -1)


def sinkhorn_knopp_log_domain(
    scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, group: ProcessGroup = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in the log domain, batched over leading dimensions.

    Args:
        scores: (..., B, K) floating point; computed in float32 (float64 stays float64).
        eps: temperature; n_iters: Sinkhorn iterations.
        group: process group the B dimension is split over (``None``: none).
    Returns:
        ``(Q, lse_b)``: Q of shape (..., B, K) in float32 (float64 for float64 input), and
        the per-sample log-normalizers of shape (..., B), whose finiteness tells whether
        the input was finite.
    """
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    logits = scores.to(compute_dtype) / eps
    lse_b = torch.zeros(logits.shape[:-1], dtype=compute_dtype, device=logits.device)
    for _ in range(n_iters):
        lse_k = torch.logsumexp(logits - lse_b.unsqueeze(-1), dim=-2)
        lse_k = all_reduce_logsumexp(lse_k, group)
        lse_b = torch.logsumexp(logits - lse_k.unsqueeze(-2), dim=-1)
    Q = torch.exp(logits - lse_k.unsqueeze(-2) - lse_b.unsqueeze(-1))
    return Q, lse_b


def swav_loss_original(
    output: torch.Tensor,
    batch_size: int,
    n_crops: int,
    crops_for_assign=(0, 1),
    temperature: float = 0.1,
    eps: float = 0.05,
    n_iters: int = 3,
    queue: torch.Tensor | None = None,
    embedding: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
    use_the_queue: bool = False,
):
    """The loss of SwAV's ``main_swav.py`` training step, with its queue handling.

    ``output`` (n_crops * batch_size, K); ``queue`` (len(crops_for_assign), L, D) is updated
    in place as in SwAV; ``embedding`` (n_crops * batch_size, D), ``prototypes`` (K, D).
    Returns ``(loss, use_the_queue)``.
    """
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[batch_size * crop_id : batch_size * (crop_id + 1)].detach()
            if queue is not None:
                if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                    use_the_queue = True
                    out = torch.cat((torch.mm(queue[i], prototypes.t()), out))
                queue[i, batch_size:] = queue[i, :-batch_size].clone()
                queue[i, :batch_size] = embedding[crop_id * batch_size : (crop_id + 1) * batch_size]
            q = sinkhorn_knopp_original(out, eps, n_iters)[-batch_size:]
        subloss = 0
        for v in range(n_crops):
            if v == crop_id:
                continue
            x = output[batch_size * v : batch_size * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * torch.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / len(crops_for_assign), use_the_queue
