"""Where the Triton kernels run: compiled on CUDA, or interpreted on the CPU (TRITON_INTERPRET=1,
as the tests run them), and whether programmatic dependent launch is there to chain them."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

try:
    import triton

    try:  # programmatic dependent launch (sm_90+), in triton's CUDA extras
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

        HAS_PDL = True
    except ImportError:
        HAS_PDL = False
    HAS_TRITON = True
except ImportError:  # the package still imports; `runs_on` answers False everywhere
    triton = None
    HAS_TRITON = False
    HAS_PDL = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """CUDA with triton, or CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def pdl_runs_on(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels on a CUDA device of compute capability 9+."""
    device = torch.device(device)
    return HAS_PDL and device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


class ModeJit:
    """A module's kernels JIT-compiled for the mode in force when each is asked for (compiled, or
    TRITON_INTERPRET=1: triton reads the variable when it decorates), cached per mode. A compiled
    kernel finds the device functions it calls by name in its module's globals, so those names are
    rebound to the functions' versions for the same mode. Call it as `_kernel(fn)[grid](...)`."""

    def __init__(self, namespace: dict, device_functions: tuple[Callable, ...] = ()):
        self._namespace = namespace
        self._device_functions = {fn.__name__: fn for fn in device_functions}
        self._cache: dict[tuple[str, bool], object] = {}
        self._bound: Optional[bool] = None

    def __call__(self, fn: Callable):
        mode = interpreting()
        if self._bound != mode:
            self._namespace.update({name: self._jit(f, mode) for name, f in self._device_functions.items()})
            self._bound = mode
        return self._jit(fn, mode)

    def _jit(self, fn: Callable, mode: bool):
        key = (fn.__name__, mode)
        if key not in self._cache:
            self._cache[key] = triton.jit(fn)
        return self._cache[key]
