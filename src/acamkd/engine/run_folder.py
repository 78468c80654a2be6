"""A run folder (``train.output_dir``) is written by one run at a time and never silently reused.

* :func:`check_writable`: before anything is built, the folder can be created and written
  (not under a file, not read-only, not without permission): a named error otherwise.
* :class:`RunFolderLock`: an exclusive ``flock`` on ``<folder>/.lock`` held while a run writes the
  folder. The kernel drops it when the process dies (even by SIGKILL), so a crash never leaves
  a stale lock; a second run into the same folder is refused, naming the holder's pid.
* :func:`check_fresh_start`: a new run (no ``--resume``) into a folder that already holds a
  run's checkpoint is refused, unless ``--overwrite`` (then the old run's files are removed).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os

from acamkd.engine.checkpoint import LAST_NAME, PREV_NAME, TMP_PATTERN

__all__ = ["OutputDirError", "RunFolderBusy", "RunFolderLock", "RUN_FILES", "check_fresh_start", "check_writable",
           "clear_run_files"]

logger = logging.getLogger("acamkd")

LOCK_NAME = ".lock"
# What a run writes into its folder (what --overwrite removes): checkpoints, logs, results.
RUN_FILES = (LAST_NAME, PREV_NAME, TMP_PATTERN, "metrics.jsonl", "final_metrics.json", "timing.json", "config.yaml",
             "tensorboard")


class OutputDirError(ValueError):
    """The output folder cannot be used: not writable, under a file, or holding another run."""


class RunFolderBusy(OutputDirError):
    """Another process holds the run folder's lock."""


def check_writable(folder: str | os.PathLike, key: str = "train.output_dir") -> None:
    """Create ``folder`` if needed and prove a file can be written there.

    Raises:
        OutputDirError: naming ``key``, the folder, the reason (read-only file system, permission,
            a file in the way) and what to do.
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        reason = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOTDIR: "a file is in the way (a path component is "
                  "not a folder)", errno.EEXIST: "a file of that name is in the way (not a folder)", errno.ENOSPC: "no space left on "
                  "the device"}.get(err.errno, err.strerror or str(err))
        raise OutputDirError(f"{key}={folder}: cannot write there: {reason}. Choose a writable folder "
                             f"({key}=PATH)") from None


class RunFolderLock:
    """``with RunFolderLock(folder):`` holds an exclusive lock on the folder for one run.

    ``lock_name`` is the lock file inside ``folder`` (default ``.lock``: the engine's lock of a run
    folder); ``busy`` is the message of the error when another process holds it, with ``{pid}``
    for the holder's pid (default: the engine's message about ``train.output_dir``). The
    experiment runner locks ``<parent>/.<run folder name>.runner.lock`` this way, beside the run
    folder (which it may move aside), so two runners never work on one run.

    Raises:
        RunFolderBusy: another live process holds it (the message names its pid and what to do).
    """

    def __init__(self, folder: str | os.PathLike, lock_name: str = LOCK_NAME, busy: str | None = None) -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, lock_name)
        self.busy = busy or (f"train.output_dir={self.folder} is being written by another acamkd run (pid {{pid}}): "
                             f"wait for it to finish, stop it, or choose another train.output_dir")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(self.busy.format(pid=holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_fresh_start(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """A run started without ``--resume``: refuse a folder holding another run's checkpoint, or
    with ``overwrite`` remove that run's files (:data:`RUN_FILES`) first.

    Raises:
        OutputDirError: the folder holds a checkpoint and ``overwrite`` is False.
    """
    folder = os.fspath(folder)
    existing = [name for name in (LAST_NAME, PREV_NAME) if os.path.isfile(os.path.join(folder, name))]
    if not existing:
        return
    if not overwrite:
        raise OutputDirError(f"train.output_dir={folder} already holds a run ({', '.join(existing)}): pass --resume "
                             f"to continue it, --overwrite to delete it and start over, or choose another "
                             f"train.output_dir")
    removed = clear_run_files(folder)
    logger.warning("--overwrite: removed the previous run's files in %s: %s", folder, ", ".join(removed))


def clear_run_files(folder: str | os.PathLike) -> list[str]:
    """Remove what a run writes into ``folder`` (:data:`RUN_FILES`: checkpoints, logs, results);
    anything else (e.g. MasKD's stage-1 tokens) stays. Returns the removed names, sorted."""
    folder = os.fspath(folder)
    removed = []
    for pattern in RUN_FILES:
        for path in glob.glob(os.path.join(folder, pattern)):
            if os.path.isdir(path):
                import shutil

                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(os.path.basename(path))
    return sorted(removed)
