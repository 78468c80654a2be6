"""Timing and peak-memory helpers shared by the benchmarks (each variant runs in its own process)."""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["available_bytes", "machine", "peak_rss_bytes", "reset_peak_rss", "sync", "time_and_peak"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    """This process's resident set now, bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux ``/proc/self/clear_refs`` mode 5),
    so a later :func:`peak_rss_bytes` counts only what ran after it, not building the models before.
    False where the kernel refuses (then the peak is the process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the process started or :func:`reset_peak_rss`, bytes
    (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` where that is missing, which is never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def time_and_peak(step: Callable[[], None], device: str, warmup: int, repeats: int,
                  before_each: Callable[[], None] = lambda: None) -> tuple[list[float], int]:
    """Run ``warmup`` then ``repeats`` synchronised calls of ``step``: the timed milliseconds
    of the repeats, and the peak memory growth in bytes over all calls (CUDA: the most allocated
    above what was held before; CPU: the resident-set high-water mark, reset here, above the
    resident set before the first call)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = _rss_bytes()
    times = []
    for i in range(warmup + repeats):
        before_each()
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()) - base
    return times, max(peak, 0)


def machine() -> dict[str, Any]:
    import platform


    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
