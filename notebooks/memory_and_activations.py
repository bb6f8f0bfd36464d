# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Where the memory goes, and what the gates look like
#
# The latest `moc pipeline profile` run of an experiment. For each trained variant: the training
# footprint (weights, gradients, AdamW states and one step's activations, as in the paper's
# Figure 1), the activation memory per module, measured (bytes autograd saves for backward) next
# to the paper's analytic accounting (Section 2), and histograms of the pre-SiLU gate values G and
# of SiLU(G) per layer, with the top-30% threshold and the cumulative distribution (Figure 5).

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else mlflow.db in the checkout's root
profile_experiment = "profile-smoke"
figures_dir = None

# %%

import matplotlib.pyplot as plt
import numpy as np

from moc_lightning.sweep import latest_parent, load_artifact_frame, load_artifact_json, notebook_setup

uri, save = notebook_setup(tracking_uri, figures_dir)

# %% [markdown]
# ## Memory breakdown

# %%
parent = latest_parent(uri, profile_experiment, moc__pipeline="profile")
breakdown = load_artifact_frame(uri, parent["run_id"], "memory_breakdown.csv")
assert len(breakdown) > 0, "the profile run logged no breakdown"
print(f"{profile_experiment}: parent run {parent['run_id']} ({parent['status']})")
breakdown.pivot_table(index="part", columns="variant", values=["analytic_mb", "measured_mb"], sort=False).round(3)

# %%
variants = list(dict.fromkeys(breakdown["variant"]))
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
bottom = np.zeros(len(variants))
for part, label in [("weights", "weights"), ("gradients", "gradients"), ("AdamW states", "AdamW states"),
                    ("activation: total", "activations (measured)")]:
    rows = breakdown[breakdown["part"] == part].set_index("variant").reindex(variants)
    values = rows["measured_mb"].fillna(rows["analytic_mb"]).fillna(0).to_numpy()
    axes[0].bar(variants, values, bottom=bottom, label=label)
    bottom += values
axes[0].set_ylabel("MiB")
axes[0].set_title("training memory (one step's activations)")
axes[0].legend(fontsize=8)

modules = [p for p in dict.fromkeys(breakdown["part"]) if p.startswith("activation: ") and p != "activation: total"]
width = 0.8 / (2 * len(variants))
for j, variant in enumerate(variants):
    rows = breakdown[breakdown["variant"] == variant].set_index("part").reindex(modules)
    for k, column in enumerate(["analytic_mb", "measured_mb"]):
        x = np.arange(len(modules)) + (2 * j + k) * width - 0.4 + width / 2
        axes[1].bar(x, rows[column].fillna(0), width, label=f"{variant} {column.split('_')[0]}",
                    hatch="//" if k else None)
axes[1].set_xticks(range(len(modules)), [m.split(": ")[1] for m in modules], rotation=30)
axes[1].set_ylabel("MiB")
axes[1].set_title("activation memory per module: analytic vs measured")
axes[1].legend(fontsize=7)
save(fig, "memory_breakdown.png")
plt.show()

# %% [markdown]
# ## Gate values before and after SiLU

# %%
histograms = load_artifact_json(uri, parent["run_id"], "gate_histograms.json")
statistics = load_artifact_frame(uri, parent["run_id"], "gate_statistics.csv")
statistics.round(4)

# %%
for variant, layers in histograms.items():
    names = sorted(layers, key=int)
    shown = sorted({names[0], names[len(names) // 3], names[(2 * len(names)) // 3], names[-1]}, key=int)
    fig, axes = plt.subplots(2, len(shown), figsize=(3.6 * len(shown), 5.6), layout="constrained", squeeze=False)
    for column, layer in enumerate(shown):
        for row, which in enumerate(["pre", "post"]):
            h = layers[layer][which]
            edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], dtype=float)
            ax = axes[row, column]
            ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.7)
            ax.axvline(h["top30_threshold"], color="#4C72B0", linestyle="--")
            ax.twinx().plot((edges[:-1] + edges[1:]) / 2, np.cumsum(counts) / counts.sum(), color="#C44E52")
            ax.set_title(f"layer {layer}: {'G' if which == 'pre' else 'SiLU(G)'}, "
                         f"{h['negative_fraction']:.0%} negative", fontsize=9)
    fig.suptitle(f"{variant}: gate values (dashed: top-30% threshold; red: cumulative)")
    save(fig, f"gate_histograms_{variant}.png")
    plt.show()
