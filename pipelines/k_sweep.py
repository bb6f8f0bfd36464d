"""`moc pipeline k-sweep`: MoC's perplexity and memory against K, the channels kept per token
(Tables 16 and 17), with dense SwiGLU as the reference."""

from __future__ import annotations

from moc_lightning.cli.config import ConfigError, build_job, compose
from moc_lightning.sweep import Child, ChildResult
from pipelines import plots
from pipelines.base import Context, Pipeline, Report
from pipelines.rows import child_row, ratio


class KSweep(Pipeline):
    name = "k-sweep"
    summary = "MoC's perplexity and memory against K"

    def k_values(self, ctx: Context) -> tuple[list[int], int, int]:
        """(K values, d_model, d_ffn): `k_values`, or `k_over_d_model` times the model's d_model."""
        job = build_job(compose([*ctx.settings["train"], *ctx.settings["variant"], *ctx.user_train], "train",
                                ctx.config_dir))
        d_model, d_ffn = job.model.d_model, job.model.d_ffn
        explicit = ctx.settings.get("k_values")
        if explicit:
            values = [int(k) for k in explicit]
        else:
            values = [max(1, round(f * d_model)) for f in ctx.settings["k_over_d_model"]]
        bad = [k for k in values if not 1 <= k <= d_ffn]
        if bad:
            raise ConfigError(f"pipeline k-sweep: K = {bad[0]} is not allowed: expected 1 <= K <= d_ffn = {d_ffn}")
        return sorted(dict.fromkeys(values)), d_model, d_ffn

    def plan(self, ctx: Context) -> list[Child]:
        values, _, _ = self.k_values(ctx)
        children = [ctx.child(f"moc-k{k}", [*ctx.settings["variant"], f"ffn.k={k}"], k=k) for k in values]
        if ctx.settings["dense"]:
            children.insert(0, ctx.child("swiglu", ["ffn=swiglu"]))
        return children

    def report(self, ctx: Context, results: list[ChildResult]) -> Report:
        _, d_model, d_ffn = self.k_values(ctx)
        dense = next((child_row(r) for r in results if r.name == "swiglu"), None)
        rows = []
        for result in results:
            row = child_row(result)
            k = result.tags.get("moc.k")
            k = int(k) if k else None
            rows.append({"variant": row.pop("variant"), "k": k, "k_over_d_ffn": None if k is None else k / d_ffn,
                         **row, "ppl_vs_dense": ratio(row["val_ppl"], dense and dense["val_ppl"])})
        swept = [row for row in rows if row["k"] is not None]
        ks = [row["k"] for row in swept]
        figure, axes = plots.grid(3, columns=3, width=4.0)
        plots.lines(axes[0], {"MoC": (ks, [row["val_ppl"] for row in swept])}, "validation perplexity vs K", "K",
                    "ppl")
        plots.lines(axes[1], {"MoC": (ks, [row["peak_memory_gb"] for row in swept])}, "peak memory vs K", "K", "GiB")
        plots.lines(axes[2], {"MoC (measured)": (ks, [row["ffn_activation_mb"] for row in swept]),
                              "MoC (analytic)": (ks, [row["ffn_activation_analytic_mb"] for row in swept])},
                    "FFN activation memory vs K", "K", "MiB")
        if dense is not None:
            for ax, key in zip(axes, ("val_ppl", "peak_memory_gb", "ffn_activation_mb")):
                if dense[key] is not None:
                    ax.axhline(dense[key], color="#555555", linestyle="--", label="dense SwiGLU")
                    ax.legend(fontsize=8)
        figure.suptitle(f"K sweep ({ctx.scale}; d_model {d_model}, d_ffn {d_ffn})")
        return Report(tables={"results": rows}, figures={"k_sweep.png": figure})
