"""`moc pipeline profile`: where a trained model's training memory goes, and what its gates look like.

For each variant, a model is trained (a child run like any other), then reloaded from that child's
last checkpoint and run on held-out batches:
- the activation memory of one training forward, per module (attention, FFN, RMSNorm, LM head, ...),
  measured (the bytes autograd saves for backward) next to the paper's analytic accounting
  (Section 2), and the whole training footprint (weights, gradients, AdamW states, activations;
  Figure 1);
- histograms of the pre-SiLU gate values G = gate_proj(x) and of SiLU(G) per layer, with the value
  above which the top 30% lie and the cumulative distribution (Figure 5). For MoC these are the
  values its Top-K chooses from (before its mask).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from moc_lightning.data import MoCDataModule
from moc_lightning.profiling import measure_model_saved_bytes, model_activation_bytes
from moc_lightning.sweep import Child, ChildResult
from moc_lightning.training.module import MoCLanguageModel
from pipelines import plots
from pipelines.base import Context, Pipeline, Report

MIB = 2**20
GIB = 2**30
TOP_FRACTION = 0.3  # Figure 5's threshold: the top 30% of values


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    # The training precision: bf16-mixed on GPU, float32 on CPU (as `moc train` does).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16), torch.bfloat16
    return contextlib.nullcontext(), torch.float32


def load_trained(result: ChildResult, device: torch.device) -> MoCLanguageModel:
    checkpoint = result.run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"pipeline profile: child {result.name} has no checkpoint at {checkpoint}")
    module = MoCLanguageModel.load_from_checkpoint(str(checkpoint), map_location=device)
    return module.to(device).train()


def held_out_batch(result: ChildResult, batch_size: Optional[int]) -> torch.Tensor:
    """The first validation batch of the child's own data, cut to `batch_size` rows."""
    data = result.job.data if batch_size is None else result.job.data.replace(batch_size=batch_size)
    batch = next(iter(MoCDataModule(data).val_dataloader()))
    return batch["input_ids"]


def memory_rows(variant: str, module: MoCLanguageModel, ids: torch.Tensor, device: torch.device) -> list[dict]:
    """Per module: measured and analytic activation MiB; then weights, gradients and AdamW states."""
    model = module.model
    autocast, dtype = _autocast(device)
    with autocast:
        measured = measure_model_saved_bytes(model, ids, labels=ids)
    analytic = model_activation_bytes(model.cfg, ids.shape[0], ids.shape[1], dtype)
    total_measured = measured.pop("total")
    rows = []
    for name in list(dict.fromkeys([*analytic, *measured])):
        rows.append({"variant": variant, "part": f"activation: {name}",
                     "analytic_mb": analytic[name] / MIB if name in analytic else None,
                     "measured_mb": measured[name] / MIB if name in measured else None})
    rows.append({"variant": variant, "part": "activation: total", "analytic_mb": sum(analytic.values()) / MIB,
                 "measured_mb": total_measured / MIB})
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # float32 master weights
    for part, nbytes in (("weights", params), ("gradients", params), ("AdamW states", 2 * params)):
        rows.append({"variant": variant, "part": part, "analytic_mb": nbytes / MIB, "measured_mb": None})
    return rows


def _histogram(values: np.ndarray, bins: int) -> dict:
    low, high = np.quantile(values, [0.001, 0.999])
    if high <= low:
        low, high = float(values.min()), float(values.max()) + 1e-6
    counts, edges = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "top30_threshold": float(np.quantile(values, 1 - TOP_FRACTION)),
        "negative_fraction": float((values < 0).mean()),
        "mean": float(values.mean()),
    }


@torch.no_grad()
def gate_histograms(module: MoCLanguageModel, ids: torch.Tensor, device: torch.device, bins: int) -> dict:
    """{layer: {'pre': histogram of G, 'post': histogram of SiLU(G)}} over every token of `ids`."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
               for i, layer in enumerate(module.model.layers)]
    autocast, _ = _autocast(device)
    try:
        with autocast:
            module.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for i, layer in enumerate(module.model.layers):
        # MoC calls gate_proj's weight inside its own autograd function, so G is recomputed from
        # the FFN's input rather than read from a hook on gate_proj.
        g = F.linear(inputs[i].float(), layer.mlp.gate_proj.weight.float()).flatten().cpu().numpy()
        out[str(i)] = {"pre": _histogram(g, bins), "post": _histogram(F.silu(torch.from_numpy(g)).numpy(), bins)}
    return out


def shown_layers(n_layers: int) -> list[int]:
    """At most four layers for the figure: first, two in the middle, last."""
    return sorted({0, n_layers // 3, (2 * n_layers) // 3, n_layers - 1})


def histogram_figure(variant: str, histograms: dict):
    layers = shown_layers(len(histograms))
    figure, axes = plots.grid(2 * len(layers), columns=len(layers), width=3.4, height=2.8)
    for column, layer in enumerate(layers):
        for row, which in enumerate(("pre", "post")):
            ax = axes[row * len(layers) + column]
            h = histograms[str(layer)][which]
            edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], dtype=float)
            ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.7)
            ax.axvline(h["top30_threshold"], color="#4C72B0", linestyle="--", linewidth=1)
            cdf = ax.twinx()
            cdf.plot((edges[:-1] + edges[1:]) / 2, np.cumsum(counts) / counts.sum(), color="#C44E52", linewidth=1)
            cdf.set_ylim(0, 1.02)
            label = "G (pre-SiLU)" if which == "pre" else "SiLU(G)"
            ax.set_title(f"layer {layer}: {label}\n{h['negative_fraction']:.0%} negative", fontsize=8)
            ax.tick_params(labelsize=7)
            cdf.tick_params(labelsize=7)
    figure.suptitle(f"{variant}: gate values (dashed: top-30% threshold, red: cumulative)", fontsize=10)
    return figure


class Profile(Pipeline):
    name = "profile"
    summary = "per-module activation memory (analytic vs measured) and gate histograms of trained models"

    def plan(self, ctx: Context) -> list[Child]:
        return [ctx.child(name, overrides) for name, overrides in ctx.selected(ctx.settings["variants"]).items()]

    def report(self, ctx: Context, results: list[ChildResult]) -> Report:
        device = _device()
        breakdown, gate_rows, histograms, figures = [], [], {}, {}
        for result in results:
            module = load_trained(result, device)
            ids = held_out_batch(result, ctx.settings.get("profile_batch_size")).to(device)
            breakdown += memory_rows(result.name, module, ids, device)
            histograms[result.name] = gate_histograms(module, ids, device, int(ctx.settings["histogram_bins"]))
            for layer, h in histograms[result.name].items():
                gate_rows.append({"variant": result.name, "layer": int(layer),
                                  "pre_silu_negative_fraction": h["pre"]["negative_fraction"],
                                  "pre_silu_top30_threshold": h["pre"]["top30_threshold"],
                                  "post_silu_top30_threshold": h["post"]["top30_threshold"],
                                  "post_silu_mean": h["post"]["mean"]})
            figures[f"gate_histograms_{result.name}.png"] = histogram_figure(result.name, histograms[result.name])
            del module
        figures["memory_breakdown.png"] = self.breakdown_figure(breakdown)
        return Report(tables={"memory_breakdown": breakdown, "gate_statistics": gate_rows}, figures=figures,
                      json={"gate_histograms.json": histograms}, main_table="memory_breakdown")

    @staticmethod
    def breakdown_figure(rows: list[dict]):
        variants = list(dict.fromkeys(row["variant"] for row in rows))
        figure, axes = plots.grid(2, width=5.2)
        # Left: the whole footprint per variant, stacked (activations measured).
        parts = ["weights", "gradients", "AdamW states", "activation: total"]
        bottom = np.zeros(len(variants))
        for part in parts:
            values = np.array([next((r["measured_mb"] if r["measured_mb"] is not None else r["analytic_mb"]
                                     for r in rows if r["variant"] == v and r["part"] == part), 0.0) for v in variants])
            axes[0].bar(variants, values, bottom=bottom, label=part.replace("activation: total", "activations"))
            bottom += values
        axes[0].set_ylabel("MiB")
        axes[0].set_title("training memory (one step's activations)", fontsize=10)
        axes[0].legend(fontsize=8)
        # Right: activation memory per module, analytic vs measured, per variant.
        modules = [r["part"] for r in rows if r["part"].startswith("activation: ") and r["part"] != "activation: total"]
        modules = list(dict.fromkeys(modules))
        width = 0.8 / (2 * len(variants))
        for j, variant in enumerate(variants):
            for k, column in enumerate(("analytic_mb", "measured_mb")):
                values = [next((r[column] or 0.0 for r in rows if r["variant"] == variant and r["part"] == m), 0.0)
                          for m in modules]
                offset = (2 * j + k) * width - 0.4 + width / 2
                axes[1].bar(np.arange(len(modules)) + offset, values, width,
                            label=f"{variant} {column.split('_')[0]}", hatch="//" if k else None)
        axes[1].set_xticks(range(len(modules)), [m.split(": ")[1] for m in modules], rotation=30, fontsize=8)
        axes[1].set_ylabel("MiB")
        axes[1].set_title("activation memory per module", fontsize=10)
        axes[1].legend(fontsize=7)
        return figure
