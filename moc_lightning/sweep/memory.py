"""Peak memory per child when several children train one after another in one process.

On a GPU, the training job's PeakMemoryMonitor resets CUDA's peak counters when a fit starts, so
`memory/run_peak_allocated_gb` is each child's own. On a CPU the job reports the process's peak
resident memory (ru_maxrss), which the kernel keeps for the process's whole life: without a reset,
the second child would report the first one's peak when that was higher. Linux resets the peak
when "5" is written to /proc/self/clear_refs; `reset_peak_memory` does that before each child.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Mapping, Optional

import torch

# Final metrics of a child, most telling first: CUDA's peak allocated, else the process's peak RSS.
PEAK_MEMORY_KEYS = (
    ("final/memory/run_peak_allocated_gb", "cuda peak allocated"),
    ("final/memory/peak_rss_gb", "process peak rss"),
)
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> bool:
    """Reset the peak counters (on a GPU after freeing what earlier children left); True when the
    CPU peak (ru_maxrss) could be reset, False where the kernel offers no way (it then keeps the
    peak of everything this process ran before)."""
    if torch.cuda.is_available():
        gc.collect()  # a full collection takes most of a second on a CPU run's heap: only where it frees device memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_memory(metrics: Mapping[str, float]) -> tuple[Optional[float], Optional[str]]:
    """(GiB, what it measures) from a child's metrics, or (None, None) when none was logged."""
    for key, kind in PEAK_MEMORY_KEYS:
        if metrics.get(key) is not None:
            return float(metrics[key]), kind
    return None, None
