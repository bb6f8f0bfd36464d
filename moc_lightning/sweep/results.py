"""Reading sweeps back from MLflow: the latest parent run of an experiment, its children, and the
tables and JSON files it logged. What the notebooks and the tests use."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from moc_lightning.tracking import resolve_tracking_uri, runs_table

ROLE_TAG = "moc.role"  # "parent" on a pipeline's or a study's parent run


def latest_parent(tracking_uri: Optional[str], experiment: str, **tags: str) -> dict[str, Any]:
    """The newest parent run of `experiment` (a row of `runs_table`) whose tags match `tags`
    (keys with dots written as double underscores: moc__pipeline="compare")."""
    wanted = {k.replace("__", "."): str(v) for k, v in tags.items()}
    parents = [row for row in runs_table(tracking_uri, experiment)
               if row.get(f"tags.{ROLE_TAG}") == "parent"
               and all(row.get(f"tags.{k}") == v for k, v in wanted.items())]
    if not parents:
        raise ValueError(f"no parent run in experiment {experiment!r}" + (f" with tags {wanted}" if wanted else ""))
    return max(parents, key=lambda row: row["start_time"])


def children_rows(tracking_uri: Optional[str], experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs of `experiment` nested under `parent_run_id`, oldest first."""
    return [row for row in runs_table(tracking_uri, experiment) if row.get("parent_run_id") == parent_run_id]


def load_artifact_text(tracking_uri: Optional[str], run_id: str, path: str) -> str:
    """The text of the artifact `path` of run `run_id`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    with tempfile.TemporaryDirectory() as folder:
        local = client.download_artifacts(run_id, path, folder)
        return Path(local).read_text()


def load_artifact_csv(tracking_uri: Optional[str], run_id: str, path: str) -> list[dict[str, str]]:
    """A CSV artifact (e.g. a pipeline's results.csv) as a list of dict rows (strings)."""
    return list(csv.DictReader(io.StringIO(load_artifact_text(tracking_uri, run_id, path))))


def load_artifact_frame(tracking_uri: Optional[str], run_id: str, path: str):
    """A CSV artifact as a pandas DataFrame (numbers parsed; pandas comes with MLflow)."""
    import pandas as pd

    return pd.read_csv(io.StringIO(load_artifact_text(tracking_uri, run_id, path)))


def load_artifact_json(tracking_uri: Optional[str], run_id: str, path: str) -> Any:
    return json.loads(load_artifact_text(tracking_uri, run_id, path))


def metric(row: Mapping[str, Any], *names: str) -> Optional[float]:
    """The first of `names` (metric keys, without "metrics.") present in a runs_table row."""
    for name in names:
        value = row.get(f"metrics.{name}")
        if value is not None and value == value:  # NaN is missing too
            return float(value)
    return None


def relocate_artifacts(tracking_uri: str, artifacts_root: str) -> int:
    """Point an SQLite store copied from another machine at its artifacts' new folder.

    MLflow keeps absolute artifact paths (`<folder>/mlruns/...` on the machine that ran the jobs);
    after copying `mlflow.db` and `mlruns/` elsewhere (e.g. back from a GPU machine), every path up
    to and including `mlruns` is replaced by `artifacts_root`, the copy's `mlruns` folder. Returns
    how many experiments and runs were changed.
    """
    import sqlite3

    uri = resolve_tracking_uri(tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"relocate_artifacts: {uri} is not an SQLite store")
    root = str(Path(artifacts_root).resolve())

    def moved(path: str) -> str:
        head, sep, tail = path.partition("/mlruns")
        return root + tail if sep and (not tail or tail.startswith("/")) else path

    changed = 0
    with sqlite3.connect(uri[len("sqlite:///"):].partition("?")[0]) as db:
        for table, key, column in (("experiments", "experiment_id", "artifact_location"), ("runs", "run_uuid", "artifact_uri")):
            for ident, path in db.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                if path and moved(path) != path:
                    db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (moved(path), ident))
                    changed += 1
    return changed


def notebook_setup(tracking_uri: Optional[str], figures_dir: Optional[str]):
    """What every notebook in notebooks/ starts with: the store it reads and its `save(fig, name)`.

    A relative SQLite path is taken from the checkout's root (where `moc` runs write mlflow.db), not
    from the notebook's folder; figures are saved as PNG into `figures_dir` when it is given.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the outputs
    uri = resolve_tracking_uri(tracking_uri, workdir=Path(__file__).resolve().parents[2])
    figures = Path(figures_dir) if figures_dir else None
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:
        if figures is not None:
            fig.savefig(figures / name, dpi=120, bbox_inches="tight")

    return uri, save
