"""Checkpoints: atomic writes, the last two kept, and everything an exact resume needs.

A checkpoint holds the networks (student, teacher), the loss state (DINO's center, SwAV's
queue, NeCo's reference queue), the optimizer, the step (schedules and data order are
functions of it), and the RNG states of torch, CUDA, Python and NumPy of every process.
Saving moves the previous checkpoint aside (``checkpoint.previous.pt``), so a file damaged
later (a full disk, a copy cut short) still leaves one to resume from.
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


def previous_path(path: str) -> str:
    root, extension = os.path.splitext(path)
    return f"{root}.previous{extension}"


def save_keeping_previous(payload: dict, path: str) -> None:
    """Move the checkpoint at ``path`` aside as its previous one, then write ``payload``."""
    if os.path.isfile(path):
        os.replace(path, previous_path(path))
    atomic_save(payload, path)


def load_checkpoint(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    # Our own file: it holds RNG states (tuples, numpy arrays), which weights_only rejects.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_newest_readable(path: str) -> tuple[Optional[dict], Optional[str], list[str]]:
    """(checkpoint, the file it came from, why newer files were skipped) among ``path`` and
    its previous one; (None, None, []) when neither exists. Raises ValueError naming each
    file and its fault when checkpoints exist but none can be read."""
    skipped = []
    for candidate in (path, previous_path(path)):
        if not os.path.isfile(candidate):
            continue
        try:
            checkpoint = load_checkpoint(candidate)
            if not isinstance(checkpoint, dict) or "step" not in checkpoint:
                raise ValueError("it is not a fastssl checkpoint")
            return checkpoint, candidate, skipped
        except Exception as error:  # a damaged file: say which and why, try the older one
            skipped.append(f"{candidate}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    if skipped:
        raise ValueError("no readable checkpoint to resume from (" + "; ".join(skipped)
                         + "); remove the damaged files or pass --resume off")
    return None, None, []
