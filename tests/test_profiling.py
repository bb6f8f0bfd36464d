"""Activation memory: what autograd saves, measured, next to the paper's accounting."""

from __future__ import annotations

import torch

from moc_lightning.ffn import FFNConfig, build_ffn
from moc_lightning.profiling import (
    SavedTensorRecorder,
    ffn_activation_bytes,
    ffn_memory_rows,
    format_table,
    measure_saved_bytes,
)

SHAPE_350M = dict(d_model=1024, d_ffn=2736, k=512)


def test_moc_saves_at_most_030x_of_dense_and_matches_the_analytic_figure():
    """Acceptance: d_model 1024, d_ffn 2736, K 512, bf16: MoC (recompute on) <= 0.30x dense
    SwiGLU's saved bytes, and within 10% of the analytic figure."""
    configs = [FFNConfig(kind="swiglu", **SHAPE_350M), FFNConfig(kind="moc", recompute=True, **SHAPE_350M)]
    dense, moc = ffn_memory_rows(configs, tokens=512, dtype=torch.bfloat16)
    print("\n" + format_table([dense, moc]))
    assert moc["vs_first"] <= 0.30, f"MoC saves {moc['vs_first']:.3f}x of dense"
    assert abs(moc["measured_vs_analytic"] - 1) <= 0.10
    # the figures themselves, from Table 1: dense keeps X, G, U, S, Z (4 d_ffn + d values);
    # MoC keeps X plus G and U at the K kept channels and their int16 indices
    assert dense["measured_bytes_per_token"] == 2 * (4 * 2736 + 1024)
    assert moc["measured_bytes_per_token"] == 2 * 1024 + 3 * 2 * 512


def test_every_kind_measured_matches_analytic():
    configs = [
        FFNConfig(kind="swiglu", **SHAPE_350M),
        FFNConfig(kind="moc", **SHAPE_350M),
        FFNConfig(kind="moc", recompute=False, **SHAPE_350M),
        FFNConfig(kind="moc", group="2:8", **SHAPE_350M),
        FFNConfig(kind="moc", group="3:7", **SHAPE_350M),
        FFNConfig(kind="relu", **SHAPE_350M),
        FFNConfig(kind="drelu", **SHAPE_350M),
        FFNConfig(kind="backrazor", backrazor_keep=0.2, **SHAPE_350M),
        FFNConfig(kind="swiglu", checkpoint=True, **SHAPE_350M),
        FFNConfig(kind="moc", checkpoint=True, **SHAPE_350M),
    ]
    rows = ffn_memory_rows(configs, tokens=64, dtype=torch.bfloat16)
    print("\n" + format_table(rows))
    for row in rows:
        assert abs(row["measured_vs_analytic"] - 1) <= 0.10, row
    by_name = {r["ffn"]: r for r in rows}
    # Table 1's ordering: MoC with recompute < MoC storing S and Z < ReLU < dense
    ratio = {name: row["vs_first"] for name, row in by_name.items()}
    assert ratio["moc_k512"] < ratio["moc_k512_stored"] < 0.35 < ratio["relu"] < ratio["swiglu"] == 1
    assert by_name["swiglu+gcp"]["measured_bytes_per_token"] == 2 * 1024


def test_recorder_counts_each_storage_once_and_skips_weights():
    lin = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)

    def twice(x):  # x is saved by both products and by the sum of squares: one buffer
        return lin(x) * x + (x * x).sum()

    with SavedTensorRecorder(lin.parameters()) as rec:
        twice(x)
    out_bytes = 4 * 8 * 4
    # x once, lin(x) once (saved by the product), nothing for the weight
    assert rec.result.total == 2 * out_bytes


def test_analytic_checkpoint_keeps_only_the_input():
    cfg = FFNConfig(kind="moc", checkpoint=True, **SHAPE_350M)
    assert ffn_activation_bytes(cfg, tokens=10, dtype=torch.float32) == {"X": 10 * 1024 * 4}


def test_autocast_weight_copies_are_not_counted():
    ffn = build_ffn(FFNConfig(kind="swiglu", d_model=32, d_ffn=64))
    x = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = measure_saved_bytes(ffn, x)
    # bf16 copies of x, G, U, S, Z: (32 + 4 * 64) * 2 bytes per row; the weights' bf16 copies are not activations
    assert saved.total == 16 * (32 + 4 * 64) * 2
