"""Where the Triton kernels run: compiled on CUDA, or interpreted on the CPU (TRITON_INTERPRET=1,
as the tests run them), and whether programmatic dependent launch is there to chain them."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    try:  # programmatic dependent launch (sm_90+), in triton's CUDA extras
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

        HAS_PDL = True
    except ImportError:
        HAS_PDL = False
    HAS_TRITON = True
except ImportError:  # the package still imports; `runs_on` answers False everywhere
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
