"""Sweeps: one MLflow parent run with training runs (children) nested under it.

What the pipelines (`moc pipeline ...`, in the checkout's `pipelines/`) and the Optuna search
(`moc search`) share: settings files with named scales under conf/, a parent run that a re-run of
the same command reopens, children that run the main job (`moc train`) and are skipped once
FINISHED or resumed from their checkpoint when killed, per-child peak memory, and reading the
results back from MLflow (for reports and notebooks).
"""

from moc_lightning.sweep.children import (
    OUTCOME_TAG,
    Child,
    ChildResult,
    ParentRun,
    is_out_of_memory,
    model_parameters,
)
from moc_lightning.sweep.memory import PEAK_MEMORY_KEYS, peak_memory, reset_peak_memory
from moc_lightning.sweep.results import (
    ROLE_TAG,
    children_rows,
    latest_parent,
    load_artifact_csv,
    load_artifact_frame,
    load_artifact_json,
    load_artifact_text,
    metric,
    notebook_setup,
    relocate_artifacts,
)
from moc_lightning.sweep.settings import (
    conf_dir,
    fingerprint,
    load_settings,
    split_overrides,
)

__all__ = [
    "OUTCOME_TAG", "PEAK_MEMORY_KEYS", "ROLE_TAG", "Child", "ChildResult", "ParentRun", "children_rows",
    "conf_dir", "fingerprint", "is_out_of_memory", "latest_parent", "load_artifact_csv", "load_artifact_frame",
    "load_artifact_json", "load_artifact_text", "notebook_setup",
    "load_settings", "metric", "relocate_artifacts", "model_parameters", "peak_memory", "reset_peak_memory", "split_overrides",
]
