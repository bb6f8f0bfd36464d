"""Which channels MoC keeps: row Top-K or grouped a:b Top-K, ranked before or after SiLU.

Backends return compact int64 indices (rows x kept channels, in no particular order); a backend
that registers `row_mask` also writes a row Top-K as a bitmask of the kept channels, which MoC's
Triton training kernels read in place of indices (`select_channel_mask`). `torch` is
plain `torch.topk`; GPU backends register themselves with `register_backend` when their kernels
are importable, and `auto` takes the first registered one that runs on the tensor's device.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# name -> (runs_on(device) -> bool, row_topk(scores, k), group_topk(scores, a, b))
_BACKENDS: dict[str, tuple[Callable, Callable, Callable]] = {}
# name -> why_not(device) -> one line saying why the backend cannot run there (or None)
_WHY_NOT: dict[str, Callable] = {}
# name -> auto_on(device) -> whether `auto` may take it there (default: wherever it runs)
_AUTO_ON: dict[str, Callable] = {}
# `auto` tries these in order; faster backends are inserted in front when they register.
_AUTO_ORDER: list[str] = []
# backends whose row Top-K writes narrower indices itself (an `out_dtype` keyword)
_ROW_OUT_DTYPE: set[str] = set()
# name -> row_topk_mask(scores, k): backends that also write the kept channels as a bitmask
_ROW_MASK: dict[str, Callable] = {}


def register_backend(name: str, runs_on: Callable, row_topk: Callable, group_topk: Callable, prefer: bool = False,
                     why_not: Optional[Callable] = None, auto_on: Optional[Callable] = None,
                     row_out_dtype: bool = False, row_mask: Optional[Callable] = None):
    _BACKENDS[name] = (runs_on, row_topk, group_topk)
    _ROW_MASK.pop(name, None)
    if row_mask is not None:
        _ROW_MASK[name] = row_mask
    _ROW_OUT_DTYPE.discard(name)
    if row_out_dtype:
        _ROW_OUT_DTYPE.add(name)
    if why_not is not None:
        _WHY_NOT[name] = why_not
    if auto_on is not None:
        _AUTO_ON[name] = auto_on
    if name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)
    _AUTO_ORDER.insert(0 if prefer else len(_AUTO_ORDER), name)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        for candidate in _AUTO_ORDER:
            if _BACKENDS[candidate][0](device) and _AUTO_ON.get(candidate, _BACKENDS[candidate][0])(device):
                return candidate
        raise RuntimeError(f"no Top-K backend runs on {device}")
    if name not in _BACKENDS:
        raise ValueError(f"topk_backend = {name!r} is not available here: choose one of auto, {', '.join(_BACKENDS)}")
    if not _BACKENDS[name][0](device):
        why = _WHY_NOT[name](device) if name in _WHY_NOT else None
        raise ValueError(f"topk_backend = {name!r} does not run on {device}: {why or 'no reason given'}; "
                         "use 'auto' or 'torch' instead")
    return name


def row_mask_native(backend: str, device: torch.device) -> bool:
    """Whether `backend` (as resolved on `device`) writes row Top-K bitmasks itself."""
    return resolve_backend(backend, device) in _ROW_MASK


def select_channel_mask(g: torch.Tensor, *, k: int, placement: str = "pre_silu",
                        backend: str = "auto") -> torch.Tensor:
    """The row Top-K's kept channels as a bitmask (uint8, rows x 4 ceil(d_ffn / 32); bit b of
    int32 word w is channel 32 w + b): written by the backend where it can, else built from its
    indices."""
    name = resolve_backend(backend, g.device)
    scores = channel_scores(g, placement)
    if name in _ROW_MASK:
        return _ROW_MASK[name](scores, k)
    return topk_triton.mask_from_indices(_BACKENDS[name][1](scores, k), g.shape[1])


def channel_scores(g: torch.Tensor, placement: str) -> torch.Tensor:
    """The values channels are ranked by: G itself (pre_silu) or |SiLU(G)| (post_silu)."""
    if placement == "pre_silu":
        return g
    return F.silu(g.float()).abs()


def select_channels(
    g: torch.Tensor,
    *,
    k: int,
    group: Optional[tuple[int, int]] = None,
    placement: str = "pre_silu",
    backend: str = "auto",
    index_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Indices (rows x kept, of `index_dtype`) of the channels of each row of G that MoC keeps.
    Backends that write narrow indices themselves do so (fewer bytes out, and no conversion)."""
    name = resolve_backend(backend, g.device)
    _, row_topk, group_topk = _BACKENDS[name]
    scores = channel_scores(g, placement)
    if group is None and name in _ROW_OUT_DTYPE:
        return row_topk(scores, k, out_dtype=index_dtype)
    idx = row_topk(scores, k) if group is None else group_topk(scores, *group)
    return idx.to(index_dtype)


def _torch_row_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, dim=-1, sorted=False).indices


def _torch_group_topk(scores: torch.Tensor, a: int, b: int) -> torch.Tensor:
    rows, width = scores.shape
    full, rest = divmod(width, b)
    parts = []
    if full:
        blocks = scores[:, : full * b].reshape(rows, full, b)
        picked = torch.topk(blocks, a, dim=-1, sorted=False).indices
        picked = picked + torch.arange(0, full * b, b, device=scores.device).unsqueeze(-1)
        parts.append(picked.reshape(rows, full * a))
    if rest:
        # The last, shorter group of `rest` channels keeps min(a, rest) of them.
        parts.append(torch.topk(scores[:, full * b :], min(a, rest), dim=-1, sorted=False).indices + full * b)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


register_backend("torch", lambda device: True, _torch_row_topk, _torch_group_topk)


# GPU backends (their modules import without triton, a GPU or RAFT; `runs_on` says where they run).
# triton goes first for `auto`; raft comes after torch, so `auto` never waits on its build or
# fails for its absence: it is used only when named.
from moc_lightning.kernels import raft_select_k, topk_triton  # noqa: E402

# `auto` takes triton on CUDA only: on CPU it runs in triton's interpreter, for tests that name it.
register_backend("triton", topk_triton.runs_on, topk_triton.row_topk, topk_triton.group_topk, prefer=True,
                 why_not=topk_triton.unavailable_reason, auto_on=lambda device: torch.device(device).type == "cuda",
                 row_out_dtype=True, row_mask=topk_triton.row_topk_mask)
register_backend("raft", raft_select_k.runs_on, raft_select_k.row_topk, raft_select_k.group_topk,
                 why_not=raft_select_k.unavailable_reason)
