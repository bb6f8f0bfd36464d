"""A parent MLflow run and the training runs nested under it.

The parent's run id is kept in its folder (as for any job), so the same command reopens the same
parent. Each child is the main job (`run_train`) with a fixed name and run folder under the
parent's folder: a child whose MLflow run is FINISHED is skipped, a killed child (RUNNING or
FAILED, with a checkpoint) resumes from that checkpoint into the same MLflow run, and a child that
ran out of memory is tagged so that a re-run does not try it again.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from moc_lightning.cli.config import ConfigError, JobConfig, build_job, compose
from moc_lightning.cli.train import run_directory, run_train
from moc_lightning.tracking import (
    TrackingConfig,
    git_commit,
    log_figure,
    log_table,
    log_text_artifact,
    read_run_id,
    tracked_run,
)
from moc_lightning.sweep.memory import reset_peak_memory

OUTCOME_TAG = "moc.outcome"  # trained | resumed | oom (set on children when they end)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is the device (or the host) running out of memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def model_parameters(params: Mapping[str, str]) -> Optional[int]:
    """The parameter count of a child's model, from its logged `model.*` params (None if missing).

    Embedding, per layer the attention (q and o: d x d; k and v: d x kv) and the three FFN
    matrices and two norms, the final norm, and an untied lm_head.
    """
    try:
        d, layers, vocab, f = (int(params[f"model.{k}"]) for k in ("d_model", "n_layers", "vocab_size", "d_ffn"))
        heads, kv_heads = int(params["model.n_heads"]), int(params["model.n_kv_heads"])
    except (KeyError, ValueError):
        return None
    kv = kv_heads * (d // heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    tied = params.get("model.tie_embeddings") == "True"
    return vocab * d * (1 if tied else 2) + layers * per_layer + d


@dataclass(frozen=True)
class Child:
    """One training run of a sweep: its name (MLflow run name and folder, unique in the sweep),
    the main job's overrides, and tags to put on its run."""

    name: str
    overrides: tuple[str, ...]
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"child name {self.name!r} is not allowed: use letters, digits and _ . + -")
        object.__setattr__(self, "overrides", tuple(self.overrides))


@dataclass
class ChildResult:
    """What a child left in MLflow: status, how this invocation handled it, its metrics and params."""

    name: str
    run_id: Optional[str]
    status: str  # the MLflow status: FINISHED, FAILED, ...
    outcome: str  # trained | resumed | skipped | oom
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    run_dir: Path
    job: JobConfig

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def value(self, *keys: str) -> Optional[float]:
        """The first of `keys` the child logged (e.g. "final/val/ppl", "val/ppl"), else None."""
        for key in keys:
            if self.metrics.get(key) is not None:
                return float(self.metrics[key])
        return None


class ParentRun:
    """The MLflow parent run of one sweep invocation; use as a context manager.

    tracking    where runs go (the children's own tracking config)
    folder      the invocation's folder: the parent's run id file, and the children's folders
    experiment  MLflow experiment of the parent and every child
    The parent ends FINISHED when the block completes, FAILED on an error, KILLED on Ctrl+C.
    """

    def __init__(self, tracking: TrackingConfig, folder: Path, experiment: str, run_name: str,
                 tags: Optional[Mapping[str, str]] = None, config_dir: Optional[str] = None,
                 say: Callable[[str], None] = print):
        self.tracking = tracking
        self.folder = Path(folder)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {**(tags or {}), "git.commit": git_commit(), "mlflow.source.git.commit": git_commit()}
        self.config_dir = config_dir
        self.say = say
        self.logger = None
        self._context = None
        self._attached_run_id: Optional[str] = None
        self._jobs: dict[tuple[str, ...], JobConfig] = {}

    @classmethod
    def attached(cls, tracking: TrackingConfig, folder: Path, experiment: str, run_name: str, run_id: str,
                 config_dir: Optional[str] = None, say: Callable[[str], None] = print) -> "ParentRun":
        """A handle on a parent run that another process opened and will end (a search's worker
        processes): children nest under it; nothing is logged on it and its status is left alone."""
        parent = cls(tracking, folder, experiment, run_name, None, config_dir, say)
        parent._attached_run_id = run_id
        return parent

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "ParentRun":
        self._context = tracked_run(self.tracking, self.folder, self.experiment, self.run_name, self.tags)
        self.logger = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        context, self._context = self._context, None
        return bool(context.__exit__(*exc))

    @property
    def run_id(self) -> Optional[str]:
        if self._attached_run_id is not None:
            return self._attached_run_id
        return None if self.logger is None else self.logger.run_id

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking.tracking_uri)

    # -- children -----------------------------------------------------------------------------

    def child_overrides(self, child: Child) -> list[str]:
        """The child's overrides, pinned to its name, its folder under the parent's and the experiment."""
        return [*child.overrides, f"name={child.name}", f"run_dir={self.folder}",
                f"tracking.experiment={self.experiment}"]

    def compose_child(self, child: Child) -> JobConfig:
        key = tuple(self.child_overrides(child))
        if key not in self._jobs:  # composing takes a few tenths of a second: once per child
            self._jobs[key] = build_job(compose(list(key), "train", self.config_dir))
        return self._jobs[key]

    def _result(self, child: Child, job: JobConfig, run_dir: Path, outcome: str) -> ChildResult:
        run_id = read_run_id(run_dir)
        if run_id is None:
            return ChildResult(child.name, None, "MISSING", outcome, {}, {}, {}, run_dir, job)
        run = self.client.get_run(run_id)
        return ChildResult(child.name, run_id, run.info.status, outcome, dict(run.data.metrics),
                           dict(run.data.params), dict(run.data.tags), run_dir, job)

    def previous(self, child: Child) -> Optional[ChildResult]:
        """The child's result when an earlier invocation finished it (or found it out of memory)."""
        job = self.compose_child(child)
        run_dir = run_directory(job)
        if read_run_id(run_dir) is None:
            return None
        result = self._result(child, job, run_dir, "skipped")
        if result.finished:
            return result
        if result.tags.get(OUTCOME_TAG) == "oom":
            result.outcome = "oom"
            return result
        return None

    def run_child(self, child: Child, callbacks: Sequence[Any] = (), catch_oom: bool = False) -> ChildResult:
        """Train `child` under this parent, or skip it when it FINISHED before; a killed child resumes.

        With `catch_oom`, running out of memory ends the child (tagged oom, status FAILED) instead of
        the sweep.
        """
        done = self.previous(child)
        if done is not None:
            return done
        job = self.compose_child(child)
        run_dir = run_directory(job)
        outcome = "resumed" if (run_dir / "checkpoints" / "last.ckpt").exists() else "trained"
        tags = {**child.tags, "moc.parent_name": self.run_name}
        reset_peak_memory()
        try:
            run_train(self.child_overrides(child), self.config_dir, print_config=False, callbacks=callbacks,
                      parent_run_id=self.run_id, tags=tags)
        except Exception as exc:  # noqa: BLE001 (only memory errors are caught, the rest re-raised)
            if not (catch_oom and is_out_of_memory(exc)):
                raise
            outcome = "oom"
        finally:
            if torch.cuda.is_available():  # hand the child's device memory back before the next one
                gc.collect()
                torch.cuda.empty_cache()
        run_id = read_run_id(run_dir)
        if run_id is not None:
            self.client.set_tag(run_id, OUTCOME_TAG, outcome)
        return self._result(child, job, run_dir, outcome)

    # -- artifacts ----------------------------------------------------------------------------

    def log_table(self, rows: list[Mapping[str, Any]], name: str) -> None:
        log_table(self.logger, rows, name)

    def log_figure(self, figure, name: str) -> None:
        log_figure(self.logger, figure, name)

    def log_text(self, text: str, name: str) -> None:
        log_text_artifact(self.logger, text, name)
