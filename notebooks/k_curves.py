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
# # K curves
#
# The latest `moc pipeline k-sweep` run of an experiment: MoC's validation perplexity and memory
# against K, the channels each token keeps (the paper's Tables 16 and 17), with dense SwiGLU as
# the reference; then each child's validation perplexity over training.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else mlflow.db in the checkout's root
k_sweep_experiment = "k-sweep-smoke"
figures_dir = None

# %%
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from moc_lightning.sweep import children_rows, latest_parent, load_artifact_frame, notebook_setup

uri, save = notebook_setup(tracking_uri, figures_dir)

# %%
parent = latest_parent(uri, k_sweep_experiment, moc__pipeline="k-sweep")
table = load_artifact_frame(uri, parent["run_id"], "results.csv")
assert len(table) > 0, "the k-sweep run has no children"
print(f"{k_sweep_experiment}: parent run {parent['run_id']} ({parent['status']})")
table[[c for c in ["variant", "k", "k_over_d_ffn", "status", "tokens", "val_ppl", "ppl_vs_dense", "peak_memory_gb",
                   "ffn_activation_mb", "ffn_activation_analytic_mb", "tokens_per_s"] if c in table.columns]].round(4)

# %%
swept = table[table["k"].notna()].sort_values("k")
dense = table[table["variant"] == "swiglu"]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
for ax, (column, title, unit) in zip(axes, [("val_ppl", "validation perplexity", "ppl"),
                                            ("peak_memory_gb", "peak memory", "GiB"),
                                            ("ffn_activation_mb", "FFN activation memory per step", "MiB")]):
    ax.plot(swept["k"], swept[column], marker="o", label="MoC")
    if column == "ffn_activation_mb":
        ax.plot(swept["k"], swept["ffn_activation_analytic_mb"], marker="x", linestyle=":", label="MoC (analytic)")
    if len(dense) and dense[column].notna().all():
        ax.axhline(float(dense[column].iloc[0]), color="#555555", linestyle="--", label="dense SwiGLU")
    ax.set_xlabel("K")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8)
fig.suptitle(k_sweep_experiment)
save(fig, "k_curves.png")
plt.show()

# %% [markdown]
# Validation perplexity over training, one curve per child.

# %%
client = MlflowClient(uri)
fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
for row in children_rows(uri, k_sweep_experiment, parent["run_id"]):
    history = sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], "val/ppl"))
    if history:
        ax.plot([s for s, _ in history], [v for _, v in history], marker=".", label=row["run_name"])
ax.set_xlabel("step")
ax.set_ylabel("validation perplexity")
ax.set_yscale("log")
ax.set_title(f"{k_sweep_experiment}: training curves")
ax.legend(fontsize=8)
save(fig, "k_training_curves.png")
plt.show()
