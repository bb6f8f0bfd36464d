"""`moc pipeline placement`: MoC's Top-K before SiLU (by G) vs after it (by |SiLU(G)|), Table 15."""

from __future__ import annotations

from moc_lightning.sweep import Child, ChildResult
from pipelines import plots
from pipelines.base import Context, Pipeline, Report
from pipelines.rows import child_row


class Placement(Pipeline):
    name = "placement"
    summary = "MoC with Top-K before SiLU vs after SiLU"

    def plan(self, ctx: Context) -> list[Child]:
        return [ctx.child(name, overrides) for name, overrides in ctx.selected(ctx.settings["variants"]).items()]

    def report(self, ctx: Context, results: list[ChildResult]) -> Report:
        rows = []
        for result in results:
            row = child_row(result)
            rows.append({"variant": row.pop("variant"), "placement": result.tags.get("ffn.placement", ""), **row})
        figure, axes = plots.grid(2)
        labels = [row["variant"] for row in rows]
        plots.bars(axes[0], labels, [row["val_ppl"] for row in rows], "validation perplexity", "ppl")
        plots.bars(axes[1], labels, [row["val_loss"] for row in rows], "validation loss", "nats/token")
        figure.suptitle(f"Top-K placement ({ctx.scale})")
        return Report(tables={"results": rows}, figures={"placement.png": figure})
