"""Theory next to measurement: analytic and measured activation bytes, side by side."""

from __future__ import annotations

from typing import Iterable

import torch

from moc_lightning.ffn import FFNConfig, build_ffn
from moc_lightning.profiling.analytic import ffn_activation_bytes
from moc_lightning.profiling.saved_tensors import measure_saved_bytes


def ffn_memory_rows(
    configs: Iterable[FFNConfig], tokens: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> list[dict]:
    """One row per FFN config: measured and analytic saved bytes per token, and their ratio to the
    first config's measurement (put the dense baseline first)."""
    rows, baseline = [], None
    for cfg in configs:
        ffn = build_ffn(cfg).to(device=device, dtype=dtype)
        x = torch.randn(tokens, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
        measured = measure_saved_bytes(ffn, x).total
        analytic = sum(ffn_activation_bytes(cfg, tokens, dtype).values())
        baseline = baseline or measured
        rows.append({
            "ffn": cfg.label,
            "measured_bytes_per_token": measured / tokens,
            "analytic_bytes_per_token": analytic / tokens,
            "measured_vs_analytic": measured / analytic,
            "vs_first": measured / baseline,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of dict rows (same keys in each)."""
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:,.3f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
