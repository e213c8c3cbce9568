"""A recipe's global batch on a GPU that holds a fraction of it: micro-batches with the full
batch's loss.

Plain gradient accumulation (a loss per micro-batch, gradients summed) changes what the
self-supervised losses compute, because they couple the rows of a batch: InfoNCE takes its
negatives from it, Barlow Twins and VICReg its statistics, KoLeo its nearest neighbours,
Sinkhorn-Knopp and centering normalize the teacher's targets over it. Gradient caching
(Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") keeps the full batch's loss exactly:

1. every micro-batch through the network without autograd, keeping only its outputs
   (embeddings, logits: N x D for the whole batch, no activations);
2. the loss on the joined outputs of the whole batch, and its gradient with respect to them
   (the loss's own state, a queue or a center, is updated once, as with the full batch);
3. every micro-batch through the network again, with autograd, back-propagating its slice
   of that gradient; parameter gradients add up to the full batch's.

The cost is one more forward of the network per step; the activations held at once are
one micro-batch's. The random state (dropout, stochastic depth) of each micro-batch's first
forward is replayed in the second, as ``torch.utils.checkpoint`` does, so both see the same
masks. Batch normalization normalizes over each micro-batch's rows: what DDP ranks holding
that many rows compute without SyncBatchNorm.

    from fastssl.accumulate import cached_gradient_step, split_batch

    for views in loader:                          # (view_1, view_2), each (B, 3, H, W)
        optimizer.zero_grad()
        loss = cached_gradient_step(
            encode=lambda micro: model(torch.cat(micro)).chunk(2),  # -> (z1, z2) of the micro-batch
            loss_fn=lambda z: criterion(*z),                         # on the full batch's (z1, z2)
            micro_batches=split_batch(views, 64),
            module=model)
        optimizer.step()

Targets from a network without gradient (an EMA teacher) need no caching: run it over the
micro-batches with :func:`without_gradient` and compute the targets on its joined output.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

Outputs = Any  # a tensor, or a tuple/list of tensors (nested)


def split_batch(batch: Any, micro_batch_size: int) -> list:
    """``batch`` (a tensor, or tuples/lists of tensors, each with the images on dim 0) cut
    into micro-batches of ``micro_batch_size`` images, in order. The batch size must be a
    multiple of it: an uneven last micro-batch would change batch normalization's groups."""
    sizes = {tensor.shape[0] for tensor in _tensors(batch)}
    if len(sizes) != 1:
        raise ValueError(f"split_batch: the tensors of the batch have different numbers of rows: {sorted(sizes)}")
    (batch_size,) = sizes
    if micro_batch_size < 1 or batch_size % micro_batch_size:
        raise ValueError(f"split_batch: the batch of {batch_size} images does not split into micro-batches of "
                         f"{micro_batch_size}; choose a divisor of {batch_size}")
    return [_map(lambda tensor: tensor[start:start + micro_batch_size], batch)
            for start in range(0, batch_size, micro_batch_size)]


def concat_rows(parts: Sequence[Outputs]) -> Outputs:
    """The micro-batches' outputs joined along dim 0: for outputs with one row per image."""
    return _zip_map(lambda tensors: torch.cat(tensors), parts)


def concat_crop_major(parts: Sequence[Outputs], micro_batch_sizes: Sequence[int]) -> Outputs:
    """Joins outputs laid out crop-major, ``(crops * m, ...)`` for a micro-batch of m images
    (crop 0's images, then crop 1's, ...), into the full batch's ``(crops * B, ...)``."""
    def join(tensors):
        groups = [tensor.unflatten(0, (-1, size)) for tensor, size in zip(tensors, micro_batch_sizes)]
        return torch.cat(groups, dim=1).flatten(0, 1)

    return _zip_map(join, parts)


def without_gradient(fn: Callable[[Any], Outputs], micro_batches: Sequence[Any],
                     join: Callable[[Sequence[Outputs]], Outputs] = concat_rows) -> Outputs:
    """``fn`` (a teacher, say) over every micro-batch without autograd, outputs joined: what
    ``fn`` gives the full batch when its rows are independent (per-micro-batch batch
    normalization aside)."""
    with torch.no_grad():
        return join([fn(micro) for micro in micro_batches])


def cached_gradient_step(encode: Callable[[Any], Outputs], loss_fn: Callable[[Outputs], torch.Tensor],
                         micro_batches: Sequence[Any], *,
                         join: Callable[[Sequence[Outputs]], Outputs] = concat_rows,
                         module: Optional[nn.Module] = None,
                         scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                         check_loss: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """The gradient of ``loss_fn(join([encode(m) for m in micro_batches]))`` accumulated into
    the parameters' ``.grad``, holding one micro-batch's activations at a time; returns the
    loss (detached).

    Args:
        encode: micro-batch -> outputs (tensors whose rows belong to its images), with the
            parameters to train; run twice per micro-batch, the same random state each time.
        loss_fn: the joined outputs of the whole batch -> scalar loss. Parameters it uses
            directly get their gradient from it.
        micro_batches: the batch cut into micro-batches (:func:`split_batch`).
        join: the micro-batches' outputs -> the full batch's (:func:`concat_rows`,
            :func:`concat_crop_major`, or the caller's own layout).
        module: the network ``encode`` runs, if it has buffers that a forward updates
            (batch normalization's running statistics): they are restored after the
            forwards without autograd, so they update once per micro-batch.
        scale: applied to the loss before backward (``GradScaler.scale``).
        no_sync: a context in which backward does not all-reduce gradients (DDP's
            ``no_sync``): every micro-batch but the last runs in it.
        check_loss: called with the loss before any backward (to stop on a non-finite one).
    """
    if not micro_batches:
        raise ValueError("cached_gradient_step: no micro-batches")
    devices = sorted({tensor.device for tensor in _tensors(micro_batches) if tensor.device.type == "cuda"},
                     key=str)
    buffers = _copy_buffers(module)
    random_states, cached = [], []
    with torch.no_grad():
        for micro in micro_batches:
            random_states.append(_random_state(devices))
            cached.append(_map(lambda tensor: tensor.detach().requires_grad_(tensor.is_floating_point()),
                               encode(micro)))
    _restore_buffers(module, buffers)

    loss = loss_fn(join(cached))
    if check_loss is not None:
        check_loss(loss)
    (loss if scale is None else scale(loss)).backward()
    random_state_after = _random_state(devices)  # where the whole batch's step would leave it

    for index, (micro, random_state) in enumerate(zip(micro_batches, random_states)):
        last = index == len(micro_batches) - 1
        _set_random_state(random_state, devices)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            outputs, gradients = [], []
            for output, leaf in zip(_tensors(encode(micro)), _tensors(cached[index])):
                if leaf.grad is not None:  # outputs the loss does not use get no gradient
                    outputs.append(output)
                    gradients.append(leaf.grad)
            if outputs:
                torch.autograd.backward(outputs, gradients)
    _set_random_state(random_state_after, devices)
    return loss.detach()


# ------------------------------------------------------------------------- helpers


def _tensors(structure) -> list[torch.Tensor]:
    if torch.is_tensor(structure):
        return [structure]
    if isinstance(structure, (tuple, list)):
        return [tensor for item in structure for tensor in _tensors(item)]
    return []


def _map(fn, structure):
    if torch.is_tensor(structure):
        return fn(structure)
    if isinstance(structure, (tuple, list)):
        return type(structure)(_map(fn, item) for item in structure)
    return structure


def _zip_map(fn, parts: Sequence):
    """``fn`` over the matching tensors of several structures of the same shape."""
    first = parts[0]
    if torch.is_tensor(first):
        return fn(list(parts))
    if isinstance(first, (tuple, list)):
        return type(first)(_zip_map(fn, [part[i] for part in parts]) for i in range(len(first)))
    return first


def _random_state(devices) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(device) for device in devices]


def _set_random_state(state: tuple, devices) -> None:
    cpu, gpus = state
    torch.set_rng_state(cpu)
    for device, gpu in zip(devices, gpus):
        torch.cuda.set_rng_state(gpu, device)


def _copy_buffers(module: Optional[nn.Module]) -> list:
    return [] if module is None else [(buffer, buffer.clone()) for buffer in module.buffers()]


def _restore_buffers(module: Optional[nn.Module], copies: list) -> None:
    with torch.no_grad():
        for buffer, copy in copies:
            buffer.copy_(copy)
