"""Checkpoints: atomic writes and everything an exact resume needs.

A checkpoint holds the networks (student, teacher), the loss state (DINO's center, SwAV's
queue, NeCo's reference queue), the optimizer, the step (schedules and data order are
functions of it), and the RNG states of torch, CUDA, Python and NumPy of every process.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict[str, Any]:
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states() -> list[dict[str, Any]]:
    """Every process's RNG states, in rank order (each process draws differently)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def atomic_save(payload: dict, path: str) -> None:
    """Write to a temporary file in the same directory, flush it to disk, then rename it
    over ``path``: a run killed mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    # Our own file: it holds RNG states (tuples, numpy arrays), which weights_only rejects.
    return torch.load(path, map_location="cpu", weights_only=False)
