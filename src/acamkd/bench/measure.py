"""Timing and peak-memory helpers shared by the benchmarks (each variant runs in its own process)."""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["sync", "available_bytes", "time_and_peak", "machine"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
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
    of the repeats, and the peak memory growth in bytes over all calls (CUDA: allocated
    above what was held before; CPU: growth of the peak resident set)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
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
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()) - base
    return times, max(peak, 0)


def machine() -> dict[str, Any]:
    import platform


    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
