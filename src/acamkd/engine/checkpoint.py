"""Checkpoints that survive a crash, a kill and a bad disk: atomic writes, a kept previous
checkpoint, a checksum, safe loads, full RNG state.

A training run must resume from its last checkpoint to the *same* result, so a checkpoint
holds everything that decides the future: weights, optimizer, scheduler, grad scaler, the
random generators of torch (CPU and CUDA), numpy and Python, and the data position. It is
written to a temporary file in the same folder and fsynced; the current checkpoint becomes
``prev.pt`` and the new one is renamed to ``last.pt``, so a kill at any instant leaves a whole
checkpoint (``last.pt``, or ``prev.pt`` between the two renames), never half of one. Each
checkpoint stores the sha256 of its tensors' bytes (``"sha256"``), checked on load: bytes
flipped by a disk are an error naming the file, and :func:`load_latest` falls back to
``prev.pt``. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code, which
is why the RNG states are stored as tensors and plain lists rather than pickled numpy objects.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointCorrupted", "CheckpointWriteError", "LAST_NAME", "PREV_NAME", "TMP_PATTERN",
           "capture_rng_state", "load_checkpoint", "load_latest", "remove_stale_temporaries", "restore_rng_state",
           "save_checkpoint", "state_digest"]

logger = logging.getLogger("acamkd")

LAST_NAME = "last.pt"  # the file --resume continues from, in the run's output folder
PREV_NAME = "prev.pt"  # the checkpoint before it, kept as a fallback
TMP_PATTERN = ".tmp-*.pt"  # a checkpoint being written (left behind only by a kill mid-write)
DIGEST_KEY = "sha256"


class CheckpointCorrupted(RuntimeError):
    """A checkpoint whose tensors do not match the checksum stored with them, or that cannot be read."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (no space left, no permission); the previous one is intact."""


def state_digest(state: Any) -> str:
    """sha256 over every tensor's bytes (with its key path, dtype and shape) and every other leaf's
    ``repr``, in a fixed order: equal states give equal digests, a flipped bit a different one."""
    digest = hashlib.sha256()

    def visit(path: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                if not (path == "" and key == DIGEST_KEY):
                    visit(f"{path}/{key!r}", value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{path}|{type(value).__name__}{len(value)}|".encode())
            for i, item in enumerate(value):
                visit(f"{path}[{i}]", item)
        else:
            digest.update(f"{path}={value!r}|".encode())

    visit("", state)
    return digest.hexdigest()


def _no_space(err: BaseException) -> bool:
    text = str(err)
    return (getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text
            or "unexpected pos" in text)  # torch's zip writer's words for a short write


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Write ``state`` (plus its checksum) to ``path`` atomically: temp file + fsync, the current
    file renamed to ``prev.pt`` (``keep_previous``), the temp file renamed to ``path``, folder fsync.

    Raises:
        CheckpointWriteError: no space left or another OS error while writing; the message names
            the file and what to do; the temporary file is removed and the old checkpoint is intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {**state, DIGEST_KEY: state_digest(state)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, os.path.join(folder, PREV_NAME))
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)):
            if _no_space(err):
                raise CheckpointWriteError(errno.ENOSPC, f"no space left on device writing {path}: free space "
                                           f"there or set train.output_dir to another disk; the previous "
                                           f"checkpoint is intact") from None
            if isinstance(err, OSError):
                raise CheckpointWriteError(err.errno, f"cannot write checkpoint {path}: "
                                           f"{err.strerror or err}; the previous checkpoint is intact") from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its checksum (``verify``; files
    without one, from before checksums or from elsewhere, load unchecked).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointCorrupted: unreadable, or its tensors differ from the stored checksum.
        ValueError: the file holds something other than a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointCorrupted(f"cannot load checkpoint {path} with weights_only=True "
                                  f"({type(err).__name__}: {err}). Is it a checkpoint written by acamkd "
                                  f"or a plain state_dict?") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    stored = state.pop(DIGEST_KEY, None)
    if verify and stored is not None and state_digest(state) != stored:
        raise CheckpointCorrupted(f"checkpoint {path} is damaged: its tensors do not match the checksum "
                                  f"written with them (a disk or copy error); use {PREV_NAME} beside it or "
                                  f"another copy")
    return state


def load_latest(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """The newest whole checkpoint of a run folder: ``last.pt``, or ``prev.pt`` when ``last.pt`` is
    missing (a kill between the two renames) or damaged (logged as a warning).

    Raises:
        FileNotFoundError: neither file exists.
        CheckpointCorrupted: every checkpoint there is damaged.
    """
    folder = os.fspath(folder)
    last, prev = os.path.join(folder, LAST_NAME), os.path.join(folder, PREV_NAME)
    if not os.path.isfile(last) and not os.path.isfile(prev):
        raise FileNotFoundError(f"no checkpoint in {folder} ({LAST_NAME} or {PREV_NAME})")
    try:
        return load_checkpoint(last, map_location), last
    except (FileNotFoundError, CheckpointCorrupted) as err:
        if not os.path.isfile(prev):
            raise
        logger.warning("%s; resuming from the previous checkpoint %s instead", err, prev)
        return load_checkpoint(prev, map_location), prev


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete half-written checkpoints (``.tmp-*.pt``) a kill left in ``folder``; call only while
    holding the run folder's lock (no other writer). Returns the removed paths."""
    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(folder), TMP_PATTERN)):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except FileNotFoundError:
            pass
    if removed:
        logger.warning("removed %d half-written checkpoint file(s) left by a killed run: %s", len(removed),
                       ", ".join(os.path.basename(p) for p in removed))
    return removed


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
