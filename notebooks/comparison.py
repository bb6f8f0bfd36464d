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
# # FFN variants compared
#
# The latest `moc pipeline compare` run of an experiment: per FFN variant, validation perplexity,
# peak memory, activation memory and training throughput, also as ratios to dense SwiGLU (the
# paper's Tables 2, 12, 13 and 14); then the latest `moc pipeline placement` run (Top-K before vs
# after SiLU, Table 15). Point the parameters at the experiments to read: `compare-smoke` for the
# CI smoke results, `compare-gpu-small` for the GPU ones.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else mlflow.db in the checkout's root
compare_experiment = "compare-smoke"
placement_experiment = "placement-smoke"  # None: skip the placement table
figures_dir = None  # a folder to save the figures in (png), or None

# %%
import matplotlib.pyplot as plt
from IPython.display import display

from moc_lightning.sweep import latest_parent, load_artifact_frame, notebook_setup

uri, save = notebook_setup(tracking_uri, figures_dir)

# %% [markdown]
# ## The comparison table

# %%
parent = latest_parent(uri, compare_experiment, moc__pipeline="compare")
table = load_artifact_frame(uri, parent["run_id"], "results.csv")
print(f"{compare_experiment}: parent run {parent['run_id']} ({parent['status']}), {len(table)} variants")
assert len(table) > 0, "the compare run has no children"
columns = ["variant", "ffn", "status", "params_m", "tokens", "val_ppl", "ppl_vs_ref", "peak_memory_gb",
           "peak_memory_vs_ref", "activation_mb", "activation_vs_ref", "tokens_per_s", "tokens_per_s_vs_ref"]
table[[c for c in columns if c in table.columns]].round(4)

# %% [markdown]
# Same token budget for every variant (the `tokens` column), so perplexities compare directly.
# Peak memory is CUDA's peak allocated on a GPU and the process's peak resident memory on a CPU
# (where it is mostly the interpreter and says little); activation memory is what one training
# step saved for backward, measured.

# %%
reference = "swiglu"
colors = ["#555555" if v == reference else "#4C72B0" for v in table["variant"]]
memory_kind = ", ".join(table["peak_memory_kind"].dropna().unique())
fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout="constrained")
for ax, (column, title, unit) in zip(axes.ravel(), [
    ("val_ppl", "validation perplexity", "ppl"),
    ("peak_memory_gb", f"peak memory ({memory_kind})", "GiB"),
    ("activation_mb", "activation memory per training step", "MiB"),
    ("tokens_per_s", "training throughput", "tokens/s"),
]):
    ax.bar(table["variant"], table[column].fillna(0), color=colors)
    ax.set_title(title)
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", rotation=35)
fig.suptitle(f"{compare_experiment}")
save(fig, "compare.png")
plt.show()

# %% [markdown]
# Perplexity against activation memory: lower-left is better on both.

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
ax.scatter(table["activation_mb"], table["val_ppl"], c=colors)
for _, row in table.iterrows():
    ax.annotate(row["variant"], (row["activation_mb"], row["val_ppl"]), fontsize=8, xytext=(3, 3),
                textcoords="offset points")
ax.set_xlabel("activation memory per training step (MiB)")
ax.set_ylabel("validation perplexity")
ax.set_title(f"{compare_experiment}: perplexity vs activation memory")
save(fig, "compare_ppl_vs_activation.png")
plt.show()

# %% [markdown]
# ## Top-K placement (Table 15)

# %%
if placement_experiment:
    placement_parent = latest_parent(uri, placement_experiment, moc__pipeline="placement")
    placement = load_artifact_frame(uri, placement_parent["run_id"], "results.csv")
    assert len(placement) > 0, "the placement run has no children"
    display(placement[[c for c in ["variant", "placement", "status", "val_ppl", "val_loss", "activation_mb",
                                   "tokens_per_s"] if c in placement.columns]].round(4))
