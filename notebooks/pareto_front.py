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
# # Perplexity against memory: the Pareto front
#
# The trials of the latest `moc search` study of an experiment, each a point (memory, validation
# perplexity), with the trials no other trial beats on both (the Pareto front). With a
# multi-objective study (`search.objectives=[ppl,memory]`) that front is the study's answer; with
# a single objective it shows what the memory budget trades away. The FFN variants of a `compare`
# run are drawn the same way (activation memory against perplexity). Either may be left out
# (its parameter set to None), not both.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else mlflow.db in the checkout's root
search_experiment = "search-moc-smoke"  # None: no study panel
compare_experiment = "compare-smoke"  # None: no FFN variants' panel
figures_dir = None

# %%
import io
import json

from IPython.display import Image, display
from matplotlib.figure import Figure

from moc_lightning.search import pareto_indices
from moc_lightning.sweep import latest_parent, load_artifact_frame, load_artifact_text, notebook_setup

uri, save = notebook_setup(tracking_uri, figures_dir)
assert search_experiment or compare_experiment, "set search_experiment or compare_experiment"
panels = [name for name in ("search", "compare") if {"search": search_experiment, "compare": compare_experiment}[name]]
# Drawn over the next cells, shown at the end: an object-API figure is not displayed when a cell ends.
fig = Figure(figsize=(6.5 * len(panels), 4.6), layout="constrained")
axis = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]))



def draw_front(ax, points, x, label_of):
    """Scatter `points` (a frame with column x and val_ppl) and step through its Pareto front."""
    front = points.iloc[pareto_indices(list(zip(points[x], points["val_ppl"])))].sort_values(x)
    ax.step(front[x], front["val_ppl"], where="post", color="#555555", label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(label_of(row), (row[x], row["val_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=8)
    return front


# %% [markdown]
# ## The study's trials

# %%
if search_experiment:
    study_parent = latest_parent(uri, search_experiment)
    trials = load_artifact_frame(uri, study_parent["run_id"], "trials.csv")
    settings = json.loads(load_artifact_text(uri, study_parent["run_id"], "search_settings.json"))["settings"]
    memory = next(c for c in trials.columns if c.startswith("memory_"))
    assert len(trials) > 0, "the study has no trials"
    print(f"study {study_parent['run_name']}: {len(trials)} trials, objectives {settings['objectives']}, "
          f"states {trials['state'].value_counts().to_dict()}")
    display(trials[["trial", "state", "retry_of", "repeat_of", "group", "placement", "k", "val_ppl", memory,
                    "pareto"]].round(4))
    done = trials[(trials["state"] == "COMPLETE") & trials["repeat_of"].isna() & trials["val_ppl"].notna()
                  & trials[memory].notna()]
    ax = axis["search"]
    for group, points in done.groupby("group"):
        ax.scatter(points[memory], points["val_ppl"], label=f"group {group}", alpha=0.8)
    if settings.get("memory_budget"):
        ax.axvline(settings["memory_budget"], color="#C44E52", linestyle="--", label="memory budget")
    front = draw_front(ax, done, memory, lambda r: (f"K={int(r['k'])}" if r["group"] == "none" else str(r["group"]))
                       + f" {r['placement']}")
    ax.set_xlabel(f"memory ({memory.split('_', 1)[1]})")
    ax.set_title(f"search {study_parent['run_name']}")
    print("Pareto front:")
    display(front[["trial", "group", "placement", "k", "val_ppl", memory]].round(4))

# %% [markdown]
# ## The FFN variants

# %%
if compare_experiment:
    compare_parent = latest_parent(uri, compare_experiment, moc__pipeline="compare")
    variants = load_artifact_frame(uri, compare_parent["run_id"], "results.csv").dropna(
        subset=["val_ppl", "activation_mb"])
    assert len(variants) > 0, "the compare run has no finished variant"
    ax = axis["compare"]
    ax.scatter(variants["activation_mb"], variants["val_ppl"], color="#4C72B0")
    draw_front(ax, variants, "activation_mb", lambda r: r["variant"])
    for _, row in variants.iterrows():
        ax.annotate(row["variant"], (row["activation_mb"], row["val_ppl"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points", color="#777777")
    ax.set_xlabel("activation memory per training step (MiB)")
    ax.set_title(f"FFN variants ({compare_experiment})")

# %%
save(fig, "pareto_front.png")
png = io.BytesIO()
fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
Image(png.getvalue())
