"""Peak memory of a rank: what decides whether a 671B run fits at all, recorded for every run."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch

_GB = 1e9


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_bytes() -> int:
    """This process's own peak resident memory since it started its program. Linux: VmHWM of /proc/self/status.
    Not ru_maxrss there: Linux carries that across exec, so a run started by a large process (a test worker, a
    notebook) reported the starter's peak (two runs of 0.8 and 1.4 GB both read 1.36 GB under pytest)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def peaks(device: torch.device) -> dict[str, float | None]:
    """This process's peak GPU memory allocated since ``reset_peaks`` and its peak resident host memory (the
    process's lifetime peak: in an in-process sweep, that of every job so far), in GB."""
    gpu = torch.cuda.max_memory_allocated(device) / _GB if device.type == "cuda" else None
    return {"peak_gpu_gb": gpu, "peak_rss_gb": peak_rss_bytes() / _GB}


def per_rank(peaks_of_ranks: Iterable[dict[str, float | None]]) -> dict[str, Any]:
    """metrics.json's ``memory``: each figure per rank, and its maximum."""
    ranks = list(peaks_of_ranks)
    out: dict[str, Any] = {}
    for key in ("peak_gpu_gb", "peak_rss_gb"):
        values = [r[key] for r in ranks]
        out[key] = values
        out[f"max_{key}"] = max(values) if all(v is not None for v in values) else None
    return out
