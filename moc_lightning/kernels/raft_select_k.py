"""RAFT's select_k (radix, 11 bits a pass) as a Top-K backend, compiled with nvcc on first use
from the headers the RAPIDS wheels ship, into a small shared library with a C entry point per
score type that Python calls through ctypes with PyTorch's pointers and current stream (no
PyTorch header is compiled in, so no PyTorch ABI has to match and one build serves any version).

Where RAFT comes from, first found wins:
  1. MOC_RAFT_HOME: a prefix with include/ (raft/, rmm/, rapids_logger/, nvtx3/, and the CCCL
     RAFT was built against: cub/, thrust/, cuda/, nv/) and lib/ (librmm.so, librapids_logger.so);
  2. the pip wheels libraft-cu13 (or -cu12), librmm-cu13 and rapids-logger, installed.
The build (nvcc, C++20, only the GPU's own architecture, a few minutes) is cached under
MOC_RAFT_BUILD_DIR, by default ~/.cache/moc_lightning/raft_select_k, named by a hash of the
source, flags and compiler. `unavailable_reason` says in one line why RAFT
cannot be used here, so selecting the backend fails clearly and `auto` simply skips it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("raft_select_k.cu")
HOME_ENV = "MOC_RAFT_HOME"
BUILD_DIR_ENV = "MOC_RAFT_BUILD_DIR"
HOW_TO_PROVIDE = (f"pip install libraft-cu13 librmm-cu13 rapids-logger (or the -cu12 wheels), or set {HOME_ENV} "
                  "to a prefix with include/ (raft, rmm, rapids_logger, nvtx3, cub, thrust, cuda, nv) and "
                  "lib/ (librmm.so, librapids_logger.so)")
# Headers that must be found, each in one of the include folders.
REQUIRED_HEADERS = ("raft/matrix/detail/select_radix.cuh", "rmm/device_buffer.hpp", "rapids_logger/logger.hpp",
                    "cub/block/block_scan.cuh")
REQUIRED_LIBS = ("librmm.so", "librapids_logger.so")


@dataclass(frozen=True)
class RaftLocation:
    include_dirs: tuple[str, ...]
    lib_dirs: tuple[str, ...]
    origin: str


def _missing(include_dirs: list[Path], lib_dirs: list[Path]) -> list[str]:
    missing = [h for h in REQUIRED_HEADERS if not any((d / h).is_file() for d in include_dirs)]
    return missing + [lib for lib in REQUIRED_LIBS if not any((d / lib).is_file() for d in lib_dirs)]


def _from_home(home: Path) -> tuple[Optional[RaftLocation], str]:
    includes, libs = [home / "include"], [home / "lib", home / "lib64"]
    missing = _missing(includes, libs)
    if missing:
        return None, f"{HOME_ENV}={home} lacks {', '.join(missing)}"
    return RaftLocation(tuple(map(str, includes)), tuple(str(d) for d in libs if d.is_dir()), f"{HOME_ENV}={home}"), ""


def _package_dir(name: str) -> Optional[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _from_wheels() -> tuple[Optional[RaftLocation], str]:
    dirs = {name: _package_dir(name) for name in ("libraft", "librmm", "rapids_logger")}
    absent = [name for name, d in dirs.items() if d is None]
    if absent:
        return None, f"no installed wheel provides {', '.join(absent)}"
    # libraft's own include/rapids holds the CCCL it was built against: it goes first.
    includes = [dirs["libraft"] / "include" / "rapids", dirs["libraft"] / "include",
                dirs["librmm"] / "include", dirs["rapids_logger"] / "include"]
    libs = [dirs["librmm"] / "lib64", dirs["rapids_logger"] / "lib64"]
    missing = _missing(includes, libs)
    if missing:
        return None, f"the installed RAPIDS wheels lack {', '.join(missing)}"
    return RaftLocation(tuple(map(str, includes)), tuple(map(str, libs)), "pip wheels"), ""


def find_raft() -> tuple[Optional[RaftLocation], str]:
    """Where RAFT's headers and libraries are, or None and what was looked for where."""
    home = os.environ.get(HOME_ENV)
    if home:
        return _from_home(Path(home).expanduser())
    return _from_wheels()


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where the RAFT backend can run on `device`, else one line saying why not and how to fix it."""
    device = torch.device(device)
    location, why = find_raft()
    headers = (f"RAFT found via {location.origin}" if location is not None
               else f"RAFT's headers and libraries were not found either: {why}; {HOW_TO_PROVIDE}")
    if device.type != "cuda":
        return f"RAFT select_k runs on CUDA tensors only, not on {device.type} ({headers})"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return f"RAFT select_k needs a CUDA build of PyTorch and a visible GPU ({headers})"
    if _nvcc() is None:
        return f"RAFT select_k is built with nvcc, and none was found: set CUDA_HOME or put nvcc on PATH ({headers})"
    if location is None:
        return f"RAFT select_k needs the RAFT headers and libraries: {why}; {HOW_TO_PROVIDE}"
    if _build_error is not None:
        return f"RAFT select_k failed to build from {location.origin}: {_build_error}"
    return None


def runs_on(device: torch.device) -> bool:
    return unavailable_reason(device) is None


_build_error: Optional[str] = None
# torch dtype -> (C type, entry point suffix) of the instantiations built.
VALUE_TYPES = {torch.bfloat16: ("__nv_bfloat16", "bf16"), torch.float16: ("__half", "f16"), torch.float32: ("float", "f32")}
_call_lock = threading.Lock()


def _nvcc() -> Optional[str]:
    """nvcc of CUDA_HOME (as PyTorch's extension builder finds it), else the one on PATH."""
    from torch.utils.cpp_extension import CUDA_HOME

    home = os.environ.get("CUDA_HOME") or CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _compile_flags(location: RaftLocation, arch: str) -> list[str]:
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", *(f"-I{d}" for d in location.include_dirs)]


def _library_path(location: RaftLocation, arch: str) -> Path:
    """Where the build for these sources, flags and compiler lives (a content hash names it)."""
    nvcc_version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_compile_flags(location, arch)).encode(), nvcc_version.encode(),
                 " ".join(location.lib_dirs).encode()):
        digest.update(part)
    root = Path(os.environ.get(BUILD_DIR_ENV, Path.home() / ".cache" / "moc_lightning" / "raft_select_k"))
    return root / f"sm{arch}-{digest.hexdigest()[:16]}" / "libmoc_raft_select_k.so"


def _build_library(location: RaftLocation, arch: str, target: Path) -> None:
    """One nvcc per translation unit, all at once (each takes minutes), then one link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    units = [("common", [])] + [(name, [f"-DMOC_RAFT_VALUE={ctype}", f"-DMOC_RAFT_NAME={name}"])
                                for ctype, name in VALUE_TYPES.values()]
    flags = _compile_flags(location, arch)
    jobs = [(target.parent / f"{name}.o", subprocess.Popen(
        [_nvcc(), "-c", str(SOURCE), "-o", str(target.parent / f"{name}.o"), *flags, *defines],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for name, defines in units]
    failures = []
    for obj, job in jobs:
        log = job.communicate()[0]
        if job.returncode != 0:
            errors = [line for line in log.splitlines() if "error" in line] or log.splitlines()[-1:]
            failures.append(f"{obj.name}: {errors[0] if errors else job.returncode}")
    if failures:
        raise RuntimeError("; ".join(failures))
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    link = [_nvcc(), "-shared", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", str(tmp),
            *(str(obj) for obj, _ in jobs), *(f"-L{d}" for d in location.lib_dirs),
            *(f"-Xlinker=-rpath,{d}" for d in location.lib_dirs), "-lrmm", "-lrapids_logger"]
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"link: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    tmp.replace(target)  # atomic: a concurrent builder never loads a half-written library
    for obj, _ in jobs:
        obj.unlink(missing_ok=True)


@lru_cache(maxsize=None)
def _library(arch: str) -> ctypes.CDLL:
    global _build_error
    location, _ = find_raft()
    try:
        target = _library_path(location, arch)
        if not target.is_file():
            _build_library(location, arch, target)
        lib = ctypes.CDLL(str(target))
    except Exception as exc:
        _build_error = f"{exc}"[:400]
        raise
    for _, name in VALUE_TYPES.values():
        fn = getattr(lib, f"moc_raft_select_k_{name}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    return lib


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def build(device: torch.device = torch.device("cuda")) -> Path:
    """Build the library now (or find the cached build) rather than on the first call; its path."""
    device = torch.device(device)
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)
    try:
        return Path(_library(_arch(device))._name)
    except Exception as exc:
        raise RuntimeError(unavailable_reason(device)) from exc


def row_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, rows x k, unordered) of the k largest scores of each row."""
    rows, width = scores.shape
    if not 1 <= k <= width:
        raise ValueError(f"k = {k} must be in [1, {width}] (the row width)")
    if scores.dtype not in VALUE_TYPES:
        raise TypeError(f"raft select_k takes bf16, fp16 or fp32 scores, got {scores.dtype}")
    if rows > torch.iinfo(torch.int32).max:
        raise ValueError(f"raft select_k takes at most 2**31 - 1 rows, got {rows}")
    lib_path = build(scores.device)
    lib = _library(_arch(scores.device))
    scores = scores.contiguous()
    indices = torch.empty(rows, k, dtype=torch.int64, device=scores.device)
    if rows == 0:
        return indices
    values = torch.empty(rows, k, dtype=scores.dtype, device=scores.device)
    error = ctypes.create_string_buffer(512)
    fn = getattr(lib, f"moc_raft_select_k_{VALUE_TYPES[scores.dtype][1]}")
    with _call_lock, torch.cuda.device(scores.device):
        stream = torch.cuda.current_stream(scores.device).cuda_stream
        status = fn(scores.data_ptr(), rows, width, k, values.data_ptr(), indices.data_ptr(),
                    scores.device.index or 0, stream, error, len(error))
    if status != 0:
        raise RuntimeError(f"raft select_k ({lib_path}) failed: {error.value.decode(errors='replace')}")
    return indices


def group_topk(scores: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """a:b groups as RAFT rows: full groups are a (rows * groups, b) view, the ragged tail its own
    call; group g's picks land at columns g*a.. as in the other backends. Correct but slow: the
    radix select spends a whole thread block on each b-wide row (only radix is built here)."""
    rows, width = scores.shape
    full, rest = divmod(width, b)
    parts = []
    if full:
        blocks = scores[:, : full * b].reshape(rows * full, b)
        picked = row_topk(blocks, a).view(rows, full, a)
        picked = picked + torch.arange(0, full * b, b, device=scores.device).view(1, full, 1)
        parts.append(picked.reshape(rows, full * a))
    if rest:
        parts.append(row_topk(scores[:, full * b:], min(a, rest)) + full * b)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
