"""`moc pipeline compare`: every FFN variant at one model size, on the same data and token budget.

Dense SwiGLU, MoC, MoC_2:8, ReLU, dReLU, BackRazor, FFN+GCP and MoC+GCP (the paper's Tables 2, 12,
13 and 14): validation perplexity, peak memory, activation memory and tokens/s, each also as a
ratio to dense SwiGLU.
"""

from __future__ import annotations

from moc_lightning.sweep import Child, ChildResult
from pipelines import plots
from pipelines.base import Context, Pipeline, Report
from pipelines.rows import child_row, with_ratios


class Compare(Pipeline):
    name = "compare"
    summary = "dense SwiGLU vs MoC, MoC_2:8, ReLU, dReLU, BackRazor, FFN+GCP, MoC+GCP at one model size"

    def plan(self, ctx: Context) -> list[Child]:
        return [ctx.child(name, overrides) for name, overrides in ctx.selected(ctx.settings["variants"]).items()]

    def report(self, ctx: Context, results: list[ChildResult]) -> Report:
        reference = ctx.settings["reference"]
        rows = with_ratios([child_row(r) for r in results], reference)
        figure, axes = plots.grid(4)
        labels = [row["variant"] for row in rows]
        memory_kind = next((row["peak_memory_kind"] for row in rows if row["peak_memory_kind"]), "")
        plots.bars(axes[0], labels, [row["val_ppl"] for row in rows], "validation perplexity", "ppl", reference)
        plots.bars(axes[1], labels, [row["peak_memory_gb"] for row in rows], f"peak memory ({memory_kind})", "GiB",
                   reference)
        plots.bars(axes[2], labels, [row["activation_mb"] for row in rows], "activation memory per step", "MiB",
                   reference)
        plots.bars(axes[3], labels, [row["tokens_per_s"] for row in rows], "training throughput", "tokens/s",
                   reference)
        figure.suptitle(f"compare ({ctx.scale})")
        return Report(tables={"results": rows}, figures={"compare.png": figure})
