"""Tracking in MLflow: where runs go (an embedded SQLite store by default), one run per training job
through Lightning's MLFlowLogger, what each run records, and a table of runs for notebooks."""

from moc_lightning.tracking.config import TrackingConfig, resolve_tracking_uri
from moc_lightning.tracking.mlflow_tracking import (
    FINAL_STATUSES,
    RUN_ID_FILE,
    ConfigChangedError,
    finish_run,
    flatten_params,
    log_config,
    log_figure,
    log_final_metrics,
    log_table,
    log_text_artifact,
    open_run,
    read_run_id,
    runs_table,
    table_csv,
    table_markdown,
    tracked_run,
)
from moc_lightning.tracking.tags import git_commit, standard_tags

__all__ = [
    "FINAL_STATUSES",
    "RUN_ID_FILE",
    "ConfigChangedError",
    "TrackingConfig",
    "finish_run",
    "flatten_params",
    "git_commit",
    "log_config",
    "log_figure",
    "log_final_metrics",
    "log_table",
    "log_text_artifact",
    "open_run",
    "read_run_id",
    "resolve_tracking_uri",
    "runs_table",
    "standard_tags",
    "table_csv",
    "table_markdown",
    "tracked_run",
]
