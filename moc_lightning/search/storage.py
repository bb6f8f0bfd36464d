"""Where a study lives: an SQLite file by default, any SQLAlchemy URL (PostgreSQL, MySQL) for
workers on several machines.

Only relational storage is offered because resuming needs heartbeats: a worker that is killed
leaves its trial RUNNING, and only RDBStorage records heartbeats that let another worker see the
trial is dead, mark it FAIL and retry it (Optuna's JournalStorage has no heartbeat). For SQLite,
used by a few local worker processes, writers wait up to a minute for the file's lock instead of
failing at once.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from moc_lightning.cli.config import ConfigError

DEFAULT_STORAGE_FILE = "optuna.db"
SQLITE_LOCK_TIMEOUT_S = 60


def resolve_storage_url(url: Optional[str], workdir: Optional[Path] = None) -> str:
    """The storage URL, with an SQLite path made absolute (default: ./optuna.db)."""
    base = Path(workdir) if workdir is not None else Path.cwd()
    if url is None:
        return "sqlite:///" + str((base / DEFAULT_STORAGE_FILE).resolve())
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"--storage {url!r} is not allowed: expected an SQLAlchemy URL such as "
                          "sqlite:///optuna.db or postgresql://user@host/db")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):].partition("?")[0]
        if path in ("", ":memory:"):
            raise ConfigError(f"--storage {url!r} is not allowed: an in-memory study cannot be shared or resumed")
        return "sqlite:///" + str((base / Path(path).expanduser()).resolve())
    if url.startswith("sqlite:"):
        raise ConfigError(f"--storage {url!r} is not allowed: an SQLite URL needs a file, sqlite:///path.db")
    return url


def _retry_callback(max_retry: Optional[int]) -> Any:
    import optuna.storages as storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


def open_storage(url: str, heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None,
                 on_stale: Optional[Callable] = None):
    """An RDBStorage for `url`; with a heartbeat, `on_stale(study, trial)` runs for each dead trial."""
    import optuna
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
        Path(url[len("sqlite:///"):].partition("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    if heartbeat_interval is not None:
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        # Optuna 4.9 renamed the argument (and the retry callback); older releases have the old names.
        name = ("heartbeat_stale_trial_callback"
                if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters
                else "failed_trial_callback")
        kwargs[name] = on_stale
    with warnings.catch_warnings():  # heartbeats are marked experimental; their use here is deliberate
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(url, **kwargs)
        except ImportError as exc:
            raise ConfigError(f"--storage {url!r}: the database driver is not installed ({exc})") from None


class StaleTrialHandler:
    """What happens to a trial whose worker died: its MLflow run is marked KILLED (the retry, which
    trains in the same folder, reopens it), then Optuna's retry callback queues the same params."""

    def __init__(self, max_retry: Optional[int], tracking_uri: Optional[str]):
        self.retry = _retry_callback(max_retry)
        self.tracking_uri = tracking_uri

    def __call__(self, study, trial) -> None:
        from moc_lightning.tracking import finish_run, read_run_id

        folder = trial.user_attrs.get("moc.child_dir")
        run_id = read_run_id(Path(folder)) if folder and Path(folder).exists() else None
        if run_id and self.tracking_uri:
            try:
                finish_run(run_id, "KILLED", tracking_uri=self.tracking_uri)
            except Exception:  # noqa: BLE001 (the retry matters more than the run's status)
                pass
        self.retry(study, trial)
