"""A study's results: one row per trial, the best trial or the Pareto front, and two figures."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from matplotlib.figure import Figure

from moc_lightning.search.settings import SearchSettings


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates minimised): a point is
    dominated when another is no worse in both and better in at least one."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(c <= a and d <= b and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def trial_rows(study: Any, memory_unit: str, settings: SearchSettings) -> list[dict]:
    """Every trial, oldest first: its state, point in the space, perplexity, memory, feasibility,
    Pareto membership and MLflow run."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        memory = t.user_attrs.get("memory")
        budget = settings.memory_budget
        intermediate = t.intermediate_values
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "retry_of": t.user_attrs.get("retry_of"),
            "repeat_of": t.user_attrs.get("repeat_of"),
            "group": t.params.get("group"),
            "placement": t.params.get("placement"),
            "k": t.user_attrs.get("k"),
            "k_fraction": t.params.get("k_fraction"),
            "val_ppl": t.user_attrs.get("ppl"),
            f"memory_{memory_unit}": memory,
            "feasible": None if budget is None or memory is None else memory <= budget,
            "last_reported_step": max(intermediate) if intermediate else None,
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            "run_id": t.user_attrs.get("mlflow_run_id", ""),
        })
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["val_ppl"] is not None
                and r[f"memory_{memory_unit}"] is not None and r["repeat_of"] is None]
    on_front = {complete[i]["trial"] for i in pareto_indices([(r[f"memory_{memory_unit}"], r["val_ppl"]) for r in complete])}
    for row in rows:
        row["pareto"] = row["trial"] in on_front
    return rows


def best_rows(rows: list[dict], settings: SearchSettings) -> list[dict]:
    """Multi-objective: the Pareto front, by memory. Single: the best feasible complete trial."""
    if settings.multi_objective:
        return sorted((r for r in rows if r["pareto"]), key=lambda r: r["val_ppl"])
    candidates = [r for r in rows if r["state"] == "COMPLETE" and r["val_ppl"] is not None and r["feasible"] is not False]
    return [min(candidates, key=lambda r: r["val_ppl"])] if candidates else []


def figures(rows: list[dict], settings: SearchSettings, memory_unit: str, title: str) -> dict[str, Figure]:
    memory_key = f"memory_{memory_unit}"
    history = Figure(figsize=(6, 3.6), layout="constrained")
    ax = history.subplots()
    best: Optional[float] = None
    xs, best_line = [], []
    for row in rows:
        ppl = row["val_ppl"]
        if ppl is None:
            continue
        marker = {"COMPLETE": "o", "PRUNED": "x"}.get(row["state"], "s")
        ax.scatter(row["trial"], ppl, marker=marker, color="#4C72B0" if row["state"] == "COMPLETE" else "#C44E52")
        if row["state"] == "COMPLETE" and row["feasible"] is not False:
            best = ppl if best is None else min(best, ppl)
        if best is not None:
            xs.append(row["trial"])
            best_line.append(best)
    if xs:
        ax.step(xs, best_line, where="post", color="#555555", label="best so far")
        ax.legend(fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation perplexity (x: pruned)")
    ax.set_title(f"{title}: history", fontsize=10)

    front = Figure(figsize=(6, 4), layout="constrained")
    ax = front.subplots()
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["val_ppl"] is not None and r[memory_key] is not None]
    for group in dict.fromkeys(r["group"] for r in complete):
        points = [r for r in complete if r["group"] == group]
        ax.scatter([r[memory_key] for r in points], [r["val_ppl"] for r in points], label=f"group {group}", alpha=0.8)
    pareto = sorted((r for r in complete if r["pareto"]), key=lambda r: r[memory_key])
    if pareto:
        ax.step([r[memory_key] for r in pareto], [r["val_ppl"] for r in pareto], where="post", color="#555555",
                label="Pareto front")
        for r in pareto:
            ax.annotate(f"K={r['k']}" if r["group"] == "none" else str(r["group"]), (r[memory_key], r["val_ppl"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    if settings.memory_budget is not None:
        ax.axvline(settings.memory_budget, color="#C44E52", linestyle="--", label="memory budget")
    ax.set_xlabel(f"memory ({memory_unit})")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{title}: perplexity vs memory", fontsize=10)
    if complete:
        ax.legend(fontsize=8)
    return {"search_history.png": history, "pareto_front.png": front}
