"""One MLflow run per training job, through Lightning's own MLFlowLogger.

The job calls `open_run` (or enters `tracked_run`) only once its inputs are validated, so bad input
never leaves a RUNNING run behind. The run id is kept in `<run_dir>/mlflow_run_id`: a restarted job with
the same run_dir logs into the same run. Every helper is a no-op when given None (tracking disabled) and
off global rank 0.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from moc_lightning.tracking.config import TrackingConfig, resolve_tracking_uri

RUN_ID_FILE = "mlflow_run_id"
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class ConfigChangedError(ValueError):
    """A resumed run was started with a different config (MLflow refuses to change a param)."""


# --------------------------------------------------------------------------------------------- runs


def read_run_id(run_dir: Path) -> Optional[str]:
    """The run id a previous start of this job left in `run_dir`, or None."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    if not run_id or not all(c in "0123456789abcdef" for c in run_id):
        raise ValueError(f"{path} holds {run_id!r}, not an MLflow run id: delete the file to start a new run")
    return run_id


def _write_run_id(run_dir: Path, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_ID_FILE + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, run_dir / RUN_ID_FILE)


def _existing_run(client: MlflowClient, run_id: str, what: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise ValueError(f"{what}: run {run_id} is not in the tracking store {client.tracking_uri} (or was deleted)")
    return run


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    items = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def open_run(
    cfg: TrackingConfig,
    run_dir: Path,
    experiment: str,
    run_name: Optional[str],
    tags: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
) -> Optional[MLFlowLogger]:
    """Create (or, after a restart, reopen) this job's MLflow run and return Lightning's logger for it.

    The run exists when this returns, and its id is in `run_dir/mlflow_run_id`; a run reopened from that
    file is set back to RUNNING and gets `tags` again. `parent_run_id` makes it a nested run (tag
    `mlflow.parentRunId`). Returns None when `cfg.enabled` is False: pass `logger or False` to the Trainer.
    """
    if not cfg.enabled:
        return None
    if not isinstance(experiment, str) or not experiment.strip():
        raise ValueError(f"open_run: experiment = {experiment!r} is not allowed: expected a non-empty name")
    run_dir = Path(run_dir)
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id is not None:
        tags[MLFLOW_PARENT_RUN_ID] = str(parent_run_id)
    run_id = read_run_id(run_dir)

    def logger_for(run_id: Optional[str]) -> MLFlowLogger:
        return MLFlowLogger(
            experiment_name=experiment,
            run_name=run_name,
            tracking_uri=cfg.tracking_uri,
            tags=dict(tags),
            artifact_location=cfg.default_artifact_location,
            run_id=run_id,
        )

    if rank_zero_only.rank != 0:  # Lightning's logger never touches the store off rank 0
        return logger_for(run_id)

    if cfg.sqlite_path is not None:
        cfg.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(cfg.tracking_uri)
    if parent_run_id is not None:
        _existing_run(client, parent_run_id, f"open_run: parent_run_id = {parent_run_id!r}")

    if run_id is not None:
        run = _existing_run(client, run_id, f"{run_dir / RUN_ID_FILE} names a run to resume, but")
        run_experiment = client.get_experiment(run.info.experiment_id).name
        if run_experiment != experiment:
            raise ValueError(
                f"{run_dir / RUN_ID_FILE} names run {run_id} of experiment {run_experiment!r}, but this job "
                f"asks for experiment {experiment!r}: use the same experiment, or another run_dir for a new run"
            )
        client.update_run(run_id, status="RUNNING", name=run_name)
        _set_tags(client, run_id, tags)
        return logger_for(run_id)

    existing = client.get_experiment_by_name(experiment)
    if existing is not None and existing.lifecycle_stage == "deleted":
        raise ValueError(
            f"experiment {experiment!r} was deleted in {cfg.tracking_uri}: restore it "
            f"(`mlflow experiments restore --experiment-id {existing.experiment_id}`) or pick another name"
        )
    logger = logger_for(None)
    run_id = logger.run_id  # creates the experiment if needed, and the run
    try:
        _write_run_id(run_dir, run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return logger


def finish_run(
    logger_or_run_id: Union[MLFlowLogger, str, None], status: str = "FINISHED", tracking_uri: Optional[str] = None
) -> None:
    """Mark the run FINISHED, FAILED or KILLED (a run id needs the `tracking_uri` it lives in)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish_run: status = {status!r} is not allowed: expected one of {', '.join(FINAL_STATUSES)}")
    if logger_or_run_id is None or rank_zero_only.rank != 0:
        return
    if isinstance(logger_or_run_id, str):
        MlflowClient(resolve_tracking_uri(tracking_uri)).set_terminated(logger_or_run_id, status)
        return
    if getattr(logger_or_run_id, "_run_id", None) is None:  # its run was never created: nothing to finish
        return
    logger_or_run_id.experiment.set_terminated(logger_or_run_id.run_id, status)


def _status_before(cfg: TrackingConfig, run_dir: Path) -> Optional[str]:
    """The status of the run a restart will reopen, before it is set back to RUNNING."""
    if not cfg.enabled or rank_zero_only.rank != 0:
        return None
    try:
        run_id = read_run_id(run_dir)
        return MlflowClient(cfg.tracking_uri).get_run(run_id).info.status if run_id else None
    except Exception:  # open_run reports what is wrong
        return None


@contextlib.contextmanager
def tracked_run(
    cfg: TrackingConfig,
    run_dir: Path,
    experiment: str,
    run_name: Optional[str],
    tags: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
) -> Iterator[Optional[MLFlowLogger]]:
    """`open_run`, then yield its logger; the run ends FINISHED on success, FAILED on an exception,
    KILLED on Ctrl+C (Lightning turns that into `sys.exit(1)`, also KILLED). The exception is re-raised.

    A `ConfigChangedError` from a resumed run leaves the run as it was before the restart.
    """
    previous = _status_before(cfg, Path(run_dir))
    logger = open_run(cfg, run_dir, experiment, run_name, tags, parent_run_id)
    try:
        yield logger
    except ConfigChangedError:
        finish_run(logger, previous if previous in FINAL_STATUSES else "FAILED")
        raise
    except KeyboardInterrupt:
        finish_run(logger, "KILLED")
        raise
    except SystemExit as exit_:
        finish_run(logger, "FINISHED" if exit_.code in (None, 0) else "KILLED")
        raise
    except BaseException:
        finish_run(logger, "FAILED")
        raise
    finish_run(logger, "FINISHED")


# ------------------------------------------------------------------------------------------ logging


def _target(logger: Optional[MLFlowLogger]) -> Optional[tuple[MlflowClient, str]]:
    """(client, run id), or None where nothing is to be logged (tracking off, or not global rank 0)."""
    if logger is None or rank_zero_only.rank != 0:
        return None
    return logger.experiment, logger.run_id


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=name + "."))
        elif len(name) > MAX_ENTITY_KEY_LENGTH:
            raise ValueError(f"key {name!r} is longer than MLflow's limit of {MAX_ENTITY_KEY_LENGTH} characters")
        else:
            flat[name] = value
    return flat


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """{'model': {'d_model': 512}} -> {'model.d_model': '512'}: stringified, cut to MLflow's value limit."""
    return {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in _flatten(config).items()}


def log_config(logger: Optional[MLFlowLogger], config: Mapping[str, Any], config_yaml: str) -> None:
    """Every resolved config field as a param (dotted keys), and the config file as `config.yaml`.

    On a resumed run, params it already has with the same value are skipped; any that differ raise
    `ConfigChangedError` before anything is logged.
    """
    target = _target(logger)
    if target is None:
        return
    client, run_id = target
    params = flatten_params(config)
    logged = client.get_run(run_id).data.params
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    if changed:
        lines = "\n".join(f"  {k}: run has {old!r}, config now {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ConfigChangedError(
            f"the config changed since MLflow run {run_id} started, and MLflow refuses to change a param:\n{lines}\n"
            f"restore the config to resume this run, or start a new run (another run_dir, or delete its {RUN_ID_FILE})"
        )
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    client.log_text(run_id, config_yaml, "config.yaml")


def log_text_artifact(logger: Optional[MLFlowLogger], text: str, name: str) -> None:
    """`text` as the artifact `name` (e.g. "model_summary.txt"; "a/b.txt" puts it in folder a)."""
    target = _target(logger)
    if target is not None:
        target[0].log_text(target[1], text, name)


def _cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of rows; its columns are every key, in order of first appearance."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[Mapping[str, Any]]) -> str:
    """The same table as CSV (full precision)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def log_table(logger: Optional[MLFlowLogger], rows: list[Mapping[str, Any]], name: str) -> None:
    """`rows` as `<name>.md` and `<name>.csv` artifacts."""
    target = _target(logger)
    if target is None:
        return
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in (".md", ".csv") else name
    target[0].log_text(target[1], table_markdown(rows), stem + ".md")
    target[0].log_text(target[1], table_csv(rows), stem + ".csv")


def log_figure(logger: Optional[MLFlowLogger], fig, name: str) -> None:
    """A matplotlib figure as a png artifact (`name`, ".png" added when it has no suffix)."""
    target = _target(logger)
    if target is not None:
        target[0].log_figure(target[1], fig, name if Path(name).suffix else name + ".png")


def log_final_metrics(logger: Optional[MLFlowLogger], metrics: Mapping[str, Any], step: int = 0) -> None:
    """Numbers measured once (peak memory, final perplexity) as metrics; nested dicts get dotted keys.

    MLflow's "latest" value of a metric is the one at the largest step: pass `step=trainer.global_step`
    when a key was also logged during training.
    """
    target = _target(logger)
    if target is None:
        return
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    values = []
    for key, value in _flatten(metrics).items():
        try:
            values.append(Metric(key, float(value), now_ms, int(step)))
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
            raise ValueError(f"log_final_metrics: {key} = {value!r} is not a number") from None
    for i in range(0, len(values), 1000):
        target[0].log_batch(target[1], metrics=values[i : i + 1000])


# ------------------------------------------------------------------------------------------- query


def _time(ms: Optional[int]) -> Optional[datetime]:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def runs_table(tracking_uri: Optional[str], experiment: str) -> list[dict[str, Any]]:
    """One row per run of `experiment`, oldest first: run_id, run_name, status, start/end time,
    parent_run_id, then `params.<key>` (strings, as MLflow keeps them), `metrics.<key>` (latest value)
    and `tags.<key>`. `pandas.DataFrame(runs_table(...))` gives a frame.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment named {experiment!r} in {uri}; it holds: {', '.join(names) or 'none'}")
    rows, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"]
        )
        for run in page:
            row = {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": _time(run.info.start_time),
                "end_time": _time(run.info.end_time),
                "parent_run_id": run.data.tags.get(MLFLOW_PARENT_RUN_ID),
            }
            row.update({f"params.{k}": v for k, v in sorted(run.data.params.items())})
            row.update({f"metrics.{k}": v for k, v in sorted(run.data.metrics.items())})
            row.update({f"tags.{k}": v for k, v in sorted(run.data.tags.items())})
            rows.append(row)
        token = page.token
        if not token:
            return rows
