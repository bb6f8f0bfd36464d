"""What every benchmark command shares: the JSON-lines record, GPU timing and the copy bandwidth.

A record is one figure: {"bench": ..., "name": ..., "value": ..., "unit": ..., plus context}.
The device, torch version and date are added to every record so a line read on its own says
where it was measured.
"""

from __future__ import annotations

import datetime
import json
import sys
from functools import lru_cache
from typing import Any, Callable, Optional

import torch


@lru_cache(maxsize=None)
def device_context() -> dict[str, Any]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def emit(bench: str, name: str, value: float, unit: str, **context: Any) -> dict[str, Any]:
    """Print one figure as a JSON line (flushed, so a killed run keeps what it printed)."""
    record = {"bench": bench, "name": name, "value": value, "unit": unit, **context, **device_context()}
    print(json.dumps(record), flush=True)
    return record


def time_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median time of fn() in milliseconds, timed with CUDA events (triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


@lru_cache(maxsize=None)
def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def floor_ms(nbytes: int) -> float:
    """The physical floor: bytes that must move through HBM over the measured copy bandwidth."""
    return nbytes / (copy_bandwidth_gbs() * 1e9) * 1e3


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_record(bench: str, name: str, ok: bool, **context: Any) -> dict[str, Any]:
    record = emit(bench, name, 1.0 if ok else 0.0, "pass", **context)
    if not ok:
        print(f"CHECK FAILED: {bench}/{name} {context}", file=sys.stderr, flush=True)
    return record


def check(bench: str, name: str, ok: bool, **context: Any) -> bool:
    """A correctness check as a record (value 1 pass, 0 fail); failures also go to stderr."""
    _check_record(bench, name, ok, **context)
    return ok


class Recorder:
    """One benchmark's emit() and check() that also append each record to a file (when a path is
    given), so a run killed at its time limit keeps what it measured."""

    def __init__(self, bench: str, path: Optional[str] = None):
        self.bench, self.path = bench, path

    def emit(self, name: str, value: float, unit: str, **context: Any) -> dict[str, Any]:
        return self._write(emit(self.bench, name, value, unit, **context))

    def check(self, name: str, ok: bool, **context: Any) -> bool:
        self._write(_check_record(self.bench, name, ok, **context))
        return ok

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record
