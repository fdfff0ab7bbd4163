"""A pass's own peak memory: GPU memory allocated, or the resident set since the pass began (Linux).

Why apart from the loop: the plan, the benchmarks and the runtime files read the same probes, and
a peak that included loading the checkpoint would overstate what a pass needs.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch


def _status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in GiB; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass


def current_rss_gib() -> float | None:
    """This process's resident memory now, to tell a pass's own peak from what came before."""
    return _status_gib("VmRSS")


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (VmHWM) over, so the pass's peak excludes loading.

    The CPU twin of ``torch.cuda.reset_peak_memory_stats``: loading a checkpoint or building a
    random model can peak above the pass itself. Linux only; elsewhere the peak is the process's.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(device: torch.device, rss_reset: bool) -> dict[str, Any]:
    """The pass's peak: GPU memory allocated on CUDA; on CPU the resident set since
    :func:`reset_peak_rss` (``peak_rss_scope: pass``) or, where it could not be reset, the process's."""
    if device.type == "cuda":
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    hwm = _status_gib("VmHWM") if rss_reset else None
    if hwm is not None:
        return {"peak_rss_gib": hwm, "peak_rss_scope": "pass"}
    return {
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_rss_scope": "process",
    }


# INC's PTQ of a model converts it in place but holds float32 copies while it traces and converts:
# a base plus this many bytes per float32 weight byte (fit on the crosscheck's carved copies).
INC_BASE_GIB, INC_PER_FP32_BYTE = 0.6, 5.0


def inc_peak_gib(params: int) -> float:
    """INC's PTQ of a model of ``params`` parameters: its peak resident set (GiB)."""
    return INC_BASE_GIB + INC_PER_FP32_BYTE * 4 * params / 2**30
