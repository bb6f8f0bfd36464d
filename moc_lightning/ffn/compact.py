"""Compact storage of sparse activation rows: the kept columns' indices plus their values."""

from __future__ import annotations

import math

import torch


def index_dtype(width: int) -> torch.dtype:
    """The smallest index type that addresses `width` columns (int16 below 32768)."""
    return torch.int16 if width <= torch.iinfo(torch.int16).max + 1 else torch.int32


def compact_indices(indices: torch.Tensor, width: int) -> torch.Tensor:
    return indices.to(index_dtype(width))


def densify(indices: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of `width` columns, zero but at `indices` where they hold `values`."""
    out = values.new_zeros(values.shape[0], width)
    return out.scatter_(1, indices.long(), values)


def keep_count(fraction: float, width: int) -> int:
    return max(1, min(width, math.ceil(fraction * width)))


def keep_largest_magnitude(t: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the `fraction` of entries largest in magnitude: (compact indices, values)."""
    width = t.shape[-1]
    idx = torch.topk(t.abs(), keep_count(fraction, width), dim=-1, sorted=False).indices
    return compact_indices(idx, width), t.gather(1, idx)
