"""Where runs are tracked: the validated tracking config and the tracking URI it resolves to.

No MLflow import here, so a config can be built and checked cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_DB_NAME = "mlflow.db"
# Stores that MLflow reaches over the network or through SQLAlchemy: passed through unchanged.
PASS_THROUGH_SCHEMES = ("http", "https", "postgresql", "mysql", "mssql", "databricks")

_FILE_STORE_GONE = (
    "MLflow's file store no longer starts (since MLflow 3.13); use an SQLite store instead, "
    "e.g. sqlite:///{suggestion}"
)


def _scheme(uri: str) -> str:
    """'postgresql+psycopg2://...' -> 'postgresql'; '' when there is no scheme."""
    head, sep, _ = uri.partition(":")
    if not sep or "/" in head or len(head) <= 1:  # no scheme, or a path, or a Windows drive letter
        return ""
    return head.split("+", 1)[0].lower()


def resolve_tracking_uri(uri: Optional[str], workdir: Optional[Path] = None) -> str:
    """The tracking URI to hand to MLflow, with any SQLite path made absolute.

    None means the environment's MLFLOW_TRACKING_URI when set, else `./mlflow.db` in `workdir`
    (default: the current directory). Relative SQLite paths are resolved against `workdir`, so that a
    notebook in notebooks/ opens the same database as a job started from the checkout's root.
    `file:` URIs and bare folders are refused: MLflow's file store no longer starts.
    http(s), postgresql, mysql, mssql and databricks URIs pass through unchanged.
    """
    base = Path(workdir) if workdir is not None else Path.cwd()
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return "sqlite:///" + str((base / DEFAULT_DB_NAME).resolve())
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"tracking URI {uri!r} is not allowed: expected a non-empty string such as sqlite:///mlflow.db")
    uri = uri.strip()
    scheme = _scheme(uri)

    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ValueError(
                f"tracking URI {uri!r} is not allowed: an SQLite URI needs a file, "
                "sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path in ("", ":memory:"):
            raise ValueError(f"tracking URI {uri!r} is not allowed: an in-memory database keeps nothing; name a file")
        resolved = (base / Path(path).expanduser()).resolve()
        return "sqlite:///" + str(resolved) + (sep + query if sep else "")

    if scheme == "file" or scheme == "":
        folder = uri
        if scheme == "file":  # file:./mlruns, file:/abs/mlruns, file:///abs/mlruns
            folder = uri[len("file:"):]
            folder = folder[2:] if folder.startswith("//") else folder
        target = (base / Path(folder).expanduser()).resolve()
        suggestion = target if target.suffix == ".db" else target.parent / DEFAULT_DB_NAME
        raise ValueError(
            f"tracking URI {uri!r} is not allowed: " + _FILE_STORE_GONE.format(suggestion=suggestion)
        )

    if scheme in PASS_THROUGH_SCHEMES:
        return uri
    raise ValueError(
        f"tracking URI {uri!r} is not allowed: expected sqlite:///<path>.db or a "
        f"{', '.join(PASS_THROUGH_SCHEMES)} URI"
    )


def _refuse(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"TrackingConfig.{field} = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class TrackingConfig:
    """How a job is tracked in MLflow.

    tracking_uri       None: MLFLOW_TRACKING_URI when set, else sqlite:///<cwd>/mlflow.db; made absolute
                       when the config is built (see `resolve_tracking_uri`).
    experiment         MLflow experiment name; None lets the job pick one.
    run_name           MLflow run name; None lets the job (or MLflow) pick one.
    artifact_location  where a NEW experiment stores artifacts (ignored for an existing one); None: for an
                       SQLite store, `mlruns/` beside the database file, else the server's default.
    enabled            False: no run is opened and nothing is logged.
    """

    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    run_name: Optional[str] = None
    artifact_location: Optional[str] = None
    enabled: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise _refuse("enabled", self.enabled, "expected true or false")
        if self.tracking_uri is not None and not isinstance(self.tracking_uri, str):
            raise _refuse("tracking_uri", self.tracking_uri, "expected None or a URI string such as sqlite:///mlflow.db")
        try:
            uri = resolve_tracking_uri(self.tracking_uri)
        except ValueError as err:
            raise ValueError(f"TrackingConfig.tracking_uri: {err}") from None
        object.__setattr__(self, "tracking_uri", uri)
        for name in ("experiment", "run_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise _refuse(name, value, "expected None or a non-empty string")
        location = self.artifact_location
        if location is not None:
            if not isinstance(location, str) or not location.strip():
                raise _refuse("artifact_location", location, "expected None, a folder or an artifact URI")
            if _scheme(location) == "":  # a local folder: absolute, for the same reason as the database
                object.__setattr__(self, "artifact_location", str(Path(location).expanduser().resolve()))

    @property
    def default_artifact_location(self) -> Optional[str]:
        """`artifact_location`, or for an SQLite store the `mlruns/` folder beside the database."""
        if self.artifact_location is not None:
            return self.artifact_location
        db_path = self.sqlite_path
        return str(db_path.parent / "mlruns") if db_path is not None else None

    @property
    def sqlite_path(self) -> Optional[Path]:
        """The database file of an SQLite store, else None."""
        if self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri[len("sqlite:///"):].partition("?")[0])
        return None
