"""Smoke results shared by test_pipelines.py, test_search.py and test_notebooks.py: every pipeline
at its smoke scale and a 6-trial study with 2 workers, run once per test session into one MLflow
store (the notebooks read them all, as they would read a real results store).

Pytest would build a session fixture once per test module that imports it, so the work is memoised
here, in the module, and each test module wraps it in its own fixture.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

PIPELINES = ("compare", "placement", "k-sweep", "batch-scaling", "profile")
EXPECTED_CHILDREN = {"compare": 8, "placement": 2, "k-sweep": 4, "batch-scaling": 6, "profile": 2}
_MEMO: dict = {}


@dataclass
class SmokeStore:
    root: Path
    outcomes: dict = field(default_factory=dict)  # pipeline name -> PipelineOutcome
    search: object = None  # SearchOutcome

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.root}/optuna.db"

    def overrides(self, root: Path | None = None) -> list[str]:
        """Main-job overrides sending runs to `root` (default: this store), with the shared data cache."""
        root = root or self.root
        return [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"run_dir={root}/runs",
                f"data.cache_dir={self.root}/cache"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The smoke models are tiny: one intra-op thread is as fast as two on 2 cores, and much faster
    when other processes share them. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _store(tmp_path_factory) -> SmokeStore:
    if "store" not in _MEMO:
        _MEMO["store"] = SmokeStore(tmp_path_factory.mktemp("smoke-results"))
    return _MEMO["store"]


def pipelines(tmp_path_factory) -> SmokeStore:
    """Every pipeline at its smoke scale (once per session)."""
    store = _store(tmp_path_factory)
    if not store.outcomes:
        from pipelines import run_pipeline

        with one_thread():
            for name in PIPELINES:
                store.outcomes[name] = run_pipeline(name, "smoke", store.overrides())
    return store


def search(tmp_path_factory) -> SmokeStore:
    """The 6-trial smoke study run by 2 worker processes on one SQLite file (once per session)."""
    store = _store(tmp_path_factory)
    if store.search is None:
        from moc_lightning.search import run_search

        with one_thread():
            store.search = run_search("moc", "smoke", store.overrides(), n_trials=6, workers=2, storage=store.storage)
    return store
