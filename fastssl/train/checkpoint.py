"""Checkpoints: atomic writes, the last two kept, and everything an exact resume needs.

A checkpoint holds the networks (student, teacher), the loss state (DINO's center, SwAV's
queue, NeCo's reference queue), the optimizer, the step (schedules and data order are
functions of it), and the RNG states of torch, CUDA, Python and NumPy of every process.
Saving moves the previous checkpoint aside (``checkpoint.previous.pt``), so a file damaged
later (a full disk, a copy cut short) still leaves one to resume from.

A checkpoint holds only tensors, numbers, strings, None and containers (NumPy's RNG state is
saved with its key as a tensor), and is loaded with ``torch.load(weights_only=True)``: a
file whose unpickling would call anything else (a pickle can run code) is refused with a
``CheckpointError`` before any of it runs. Checkpoints written before NumPy's state was
converted hold it as NumPy's own tuple with a uint32 array; the load allows exactly what
that array needs (``ndarray``, ``dtype``, the uint32 dtype's class and ``_reconstruct``),
within the load only, so those still resume.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, or must not be loaded; the message is one line
    naming the file(s) and the fault."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss),
                   float(cached_gaussian))
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_state)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (NumPy's key as a tensor, or as NumPy's own array in
    checkpoints written before it was converted)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key.numpy() if torch.is_tensor(key) else key, dtype=np.uint32), *rest))
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


def _numpy_array_globals() -> list:
    """What unpickling a NumPy array needs (NumPy's RNG key in older checkpoints), under the
    module names of NumPy 2 (numpy._core) and NumPy 1 (numpy.core) that a file may hold."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct")]


def _refused_globals(path: str, error: Exception) -> list[str]:
    """The functions and classes that unpickling ``path`` would call beyond what
    weights_only allows, by name (read from the file without running it); [] if the load
    failed for another reason (a damaged file)."""
    try:
        allowed = {"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                   "numpy.core.multiarray._reconstruct"}
        names = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
        if names:
            return names
    except Exception:  # not a zip checkpoint (the legacy format), or damaged: read the unpickler's reason
        pass
    return re.findall(r"Unsupported global: GLOBAL (\S+)", str(error))[:1]


def _unpickling_reason(error: Exception) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    return found.group(1).strip() if found else (str(error).splitlines() or [""])[0]


def _first_sentence(message: str) -> str:
    """The fault without the advice that follows it (torch's reader adds several sentences)."""
    line = (message.splitlines() or [""])[0]
    return re.split(r"(?<=\.) ", line, maxsplit=1)[0].rstrip(".")


def load_checkpoint(path: str) -> Optional[dict]:
    """The checkpoint at ``path`` (None if there is no file), loaded with weights_only=True.
    Raises CheckpointError if unpickling it would call a function or class: a fastssl
    checkpoint never does, and a pickle that does can run any code."""
    if not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):  # older checkpoints' NumPy RNG key
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_globals(path, error)
        if refused:
            raise CheckpointError(
                f"refusing to load {path}: unpickling it would call {', '.join(refused)}, which can run "
                "code and is no part of a fastssl checkpoint (tensors, numbers, strings and containers "
                "only); it was not written by fastssl's trainer. Nothing of it was run.") from None
        raise pickle.UnpicklingError(f"not a readable checkpoint ({_unpickling_reason(error)})") from None


def load_newest_readable(path: str) -> tuple[Optional[dict], Optional[str], list[str]]:
    """(checkpoint, the file it came from, why newer files were skipped) among ``path`` and
    its previous one; (None, None, []) when neither exists. Raises CheckpointError naming
    each file and its fault when checkpoints exist but none can be read, and at once for a
    file that would run code (refused, not skipped: it did not come from this trainer)."""
    skipped = []
    for candidate in (path, previous_path(path)):
        if not os.path.isfile(candidate):
            continue
        try:
            checkpoint = load_checkpoint(candidate)
            if not isinstance(checkpoint, dict) or "step" not in checkpoint:
                raise ValueError("it is not a fastssl checkpoint")
            return checkpoint, candidate, skipped
        except CheckpointError:
            raise
        except Exception as error:  # a damaged file: say which and why, try the older one
            skipped.append(f"{candidate}: {type(error).__name__}: {_first_sentence(str(error))}")
    if skipped:
        raise CheckpointError("no readable checkpoint to resume from (" + "; ".join(skipped)
                              + "); remove the damaged files or pass --resume off")
    return None, None, []
