"""`moc pipeline batch-scaling`: peak memory and tokens/s against batch size for dense SwiGLU and
MoC, up to the largest batch that fits (Table 18).

Batch sizes are an explicit list (`batch_sizes`), or double from `start_batch` up to `max_batch`.
Running out of memory ends that variant's climb: the child is tagged oom (its MLflow run FAILED)
and the table says OOM; larger batches of that variant are not tried, now or on a re-run.
"""

from __future__ import annotations

from moc_lightning.cli.config import ConfigError
from moc_lightning.sweep import Child, ChildResult, ParentRun
from pipelines import plots
from pipelines.base import Context, Pipeline, Report, announce
from pipelines.rows import child_row


class BatchScaling(Pipeline):
    name = "batch-scaling"
    summary = "peak memory and tokens/s against batch size, dense vs MoC, up to out of memory"

    @staticmethod
    def batch_sizes(settings: dict) -> list[int]:
        explicit = settings.get("batch_sizes")
        if explicit:
            sizes = [int(b) for b in explicit]
        else:
            start, stop = int(settings["start_batch"]), int(settings["max_batch"])
            sizes = []
            while start >= 1 and start <= stop:
                sizes.append(start)
                start *= 2
        if not sizes or any(b < 1 for b in sizes):
            raise ConfigError(f"pipeline batch-scaling: batch sizes {sizes} are not allowed: expected integers >= 1 "
                              "(pipeline.batch_sizes, or start_batch <= max_batch)")
        return sorted(dict.fromkeys(sizes))

    def plan(self, ctx: Context) -> list[Child]:
        return [ctx.child(f"{variant}-bsz{b}", [*overrides, f"data.batch_size={b}"], batch_size=b, ffn_variant=variant)
                for variant, overrides in ctx.selected(ctx.settings["variants"]).items()
                for b in self.batch_sizes(ctx.settings)]

    def execute(self, ctx: Context, parent: ParentRun, children: list[Child]) -> list[ChildResult]:
        results, out_of_memory = [], set()
        for i, child in enumerate(children, 1):
            variant = child.tags["moc.ffn_variant"]
            if variant in out_of_memory:  # a smaller batch of this variant did not fit
                ctx.say(f"moc pipeline {ctx.pipeline}: [{i}/{len(children)}] {child.name}: not tried (a smaller batch ran out of memory)")
                continue
            result = announce(ctx, parent.run_child(child, catch_oom=True), i, len(children))
            results.append(result)
            if result.outcome == "oom":
                out_of_memory.add(variant)
        return results

    def report(self, ctx: Context, results: list[ChildResult]) -> Report:
        rows = []
        for result in results:
            row = child_row(result)
            rows.append({"variant": result.tags.get("moc.ffn_variant", ""), "batch_size": int(result.tags["moc.batch_size"]),
                         "status": row["status"], "tokens_per_s": row["tokens_per_s"],
                         "peak_memory_gb": row["peak_memory_gb"], "peak_memory_kind": row["peak_memory_kind"],
                         "activation_mb": row["activation_mb"], "val_ppl": row["val_ppl"], "ffn": row["ffn"],
                         "run_id": row["run_id"]})
        largest = {}
        for row in rows:
            if row["status"] == "FINISHED":
                largest[row["variant"]] = max(largest.get(row["variant"], 0), row["batch_size"])
        summary = [{"variant": v, "largest_batch_that_fits": b,
                    "ran_out_of_memory": any(r["variant"] == v and r["status"] == "OOM" for r in rows)}
                   for v, b in largest.items()]
        figure, axes = plots.grid(2)
        by_variant: dict[str, list[dict]] = {}
        for row in rows:
            by_variant.setdefault(row["variant"], []).append(row)
        memory_kind = next((row["peak_memory_kind"] for row in rows if row["peak_memory_kind"]), "")
        plots.lines(axes[0], {v: ([r["batch_size"] for r in rs], [r["peak_memory_gb"] for r in rs])
                              for v, rs in by_variant.items()}, f"peak memory ({memory_kind})", "batch size", "GiB",
                    logx=True)
        plots.lines(axes[1], {v: ([r["batch_size"] for r in rs], [r["tokens_per_s"] for r in rs])
                              for v, rs in by_variant.items()}, "training throughput", "batch size", "tokens/s",
                    logx=True)
        for v, rs in by_variant.items():
            for r in rs:
                if r["status"] == "OOM":
                    axes[0].axvline(r["batch_size"], linestyle=":", color="#C44E52")
                    axes[0].annotate(f"{v} OOM", (r["batch_size"], 0), rotation=90, fontsize=7, color="#C44E52")
        figure.suptitle(f"batch scaling ({ctx.scale})")
        return Report(tables={"results": rows, "largest_batch": summary}, figures={"batch_scaling.png": figure})
