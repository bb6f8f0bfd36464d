"""Figures for the reports, drawn with matplotlib's object API (no pyplot, no GUI backend: a Figure
renders to png through Agg wherever the pipeline runs)."""

from __future__ import annotations

from typing import Optional, Sequence

from matplotlib.figure import Figure


def grid(n_panels: int, columns: int = 2, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list]:
    """A figure with `n_panels` axes in rows of `columns`; unused cells are hidden."""
    columns = max(1, min(columns, n_panels))
    rows = -(-n_panels // columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes[:n_panels]


def bars(ax, labels: Sequence[str], values: Sequence[Optional[float]], title: str, ylabel: str,
         reference: Optional[str] = None) -> None:
    """One bar per label (missing values drawn as an empty slot, marked n/a); the reference bar darker."""
    heights = [0.0 if v is None else v for v in values]
    colors = ["#555555" if label == reference else "#4C72B0" for label in labels]
    drawn = ax.bar(range(len(labels)), heights, color=colors)
    for bar, value in zip(drawn, values):
        ax.annotate("n/a" if value is None else f"{value:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def lines(ax, series: dict[str, tuple[Sequence[float], Sequence[Optional[float]]]], title: str, xlabel: str,
          ylabel: str, logx: bool = False) -> None:
    """One line per series (label -> (xs, ys)); points with no value are left out."""
    for label, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize=8)
