"""Checkpoints that survive a crash and a kill: atomic writes, safe loads, full RNG state.

A training run must resume from its last checkpoint to the *same* result, so a checkpoint
holds everything that decides the future: weights, optimizer, scheduler, grad scaler, the
random generators of torch (CPU and CUDA), numpy and Python, and the data position. It is
written to a temporary file in the same folder, fsynced, then renamed over the old one, so a
kill at any instant leaves either the old or the new checkpoint, never half of one. Loading
uses ``torch.load(weights_only=True)``: a checkpoint cannot run code, which is why the RNG
states are stored as tensors and plain lists rather than pickled numpy objects.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state", "LAST_NAME"]

LAST_NAME = "last.pt"  # the file --resume continues from, in the run's output folder


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename + folder fsync)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors name the file and what to do."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"cannot load checkpoint {path} with weights_only=True "
                           f"({type(err).__name__}: {err}). Is it a checkpoint written by acamkd "
                           f"or a plain state_dict?") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Every generator that can change the future of a run, in weights_only-loadable form."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
