"""The columns every pipeline table shares: one row per child, from what it logged in MLflow."""

from __future__ import annotations

from typing import Optional

from moc_lightning.sweep import ChildResult, model_parameters, peak_memory


def child_row(result: ChildResult) -> dict:
    """variant, FFN, status, size, token budget, perplexity, memory and throughput of one child.

    Peak memory is CUDA's peak allocated on a GPU, the process's peak resident memory on a CPU
    (`peak_memory_kind` says which); activation memory is what autograd saved for backward in one
    training step, measured (all modules, and the FFNs alone) and, for the FFNs, the analytic figure.
    """
    peak, kind = peak_memory(result.metrics)
    params = model_parameters(result.params)
    return {
        "variant": result.name,
        "ffn": result.tags.get("moc.ffn_label", ""),
        "status": "OOM" if result.outcome == "oom" else result.status,
        "params_m": None if params is None else params / 1e6,
        "tokens": result.value("train/tokens_seen"),
        "val_ppl": result.value("final/val/ppl", "val/ppl"),
        "val_loss": result.value("final/val/loss", "val/loss"),
        "peak_memory_gb": peak,
        "peak_memory_kind": kind or "",
        "activation_mb": result.value("activation/measured_mb"),
        "ffn_activation_mb": result.value("activation/ffn_mb"),
        "ffn_activation_analytic_mb": result.value("activation/ffn_analytic_mb"),
        "tokens_per_s": result.value("train/device/items_per_sec"),
        "run_id": result.run_id or "",
    }


def ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def with_ratios(rows: list[dict], reference_variant: str) -> list[dict]:
    """Rows with perplexity, memory and throughput as ratios to the reference row (dense SwiGLU)."""
    reference = next((row for row in rows if row["variant"] == reference_variant), None)
    if reference is None:
        return rows
    out = []
    for row in rows:
        row = dict(row)
        row["ppl_vs_ref"] = ratio(row["val_ppl"], reference["val_ppl"])
        row["peak_memory_vs_ref"] = ratio(row["peak_memory_gb"], reference["peak_memory_gb"])
        row["activation_vs_ref"] = ratio(row["activation_mb"], reference["activation_mb"])
        row["tokens_per_s_vs_ref"] = ratio(row["tokens_per_s"], reference["tokens_per_s"])
        out.append(row)
    return out


def brief(rows: list[dict], columns: list[str]) -> list[dict]:
    """The rows cut to `columns` (for the printed summary)."""
    return [{c: "" if row.get(c) is None else row.get(c) for c in columns} for row in rows]
