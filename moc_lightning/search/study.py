"""`moc search`: create or resume a study, run its trials in worker processes, report.

The study is named by its space, scale and a hash of its settings and overrides (not of n_trials),
so the same command resumes it, and a larger --n-trials extends it. One MLflow parent run per
study (its id kept in the run folder and in the study's user attributes); each trial is a child
run. `--workers N` starts N worker processes on the same storage; each runs its share of the
trials still to do. A trial whose worker was killed is found through its stale heartbeat, marked
FAIL, and retried with the same params in the same run folder, so it resumes from its checkpoint
into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from moc_lightning.cli.config import ConfigError, build_job, compose
from moc_lightning.search.objective import Objective, TrialOutOfMemory, WorkerSpec, constraint, spec_path
from moc_lightning.search.report import best_rows, figures, trial_rows
from moc_lightning.search.settings import AUTO_MEMORY, SearchSettings
from moc_lightning.search.storage import StaleTrialHandler, open_storage, resolve_storage_url
from moc_lightning.sweep import ParentRun, conf_dir, fingerprint, load_settings, split_overrides
from moc_lightning.tracking import RUN_ID_FILE, read_run_id, table_markdown

PARENT_ATTR = "moc.parent_run_id"
# Settings that do not change what a trial computes: changing them keeps the same study.
NOT_IDENTIFYING = ("n_trials", "heartbeat_interval", "grace_period", "max_retry")
FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass
class SearchOutcome:
    study: str
    storage: str
    experiment: str
    parent_run_id: str
    trials: list[dict]
    best: list[dict]


@contextlib.contextmanager
def _experimental_allowed() -> Iterator[None]:
    """Heartbeats and stale-trial handling are marked experimental in Optuna; their use is deliberate."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_sampler(settings: SearchSettings, worker_index: int, trials_so_far: int):
    """The sampler of one worker: seeds differ per worker and per resume, so that parallel workers
    and a resumed study do not replay the same random start."""
    import optuna

    seed = settings.sampler["seed"] + 1000 * worker_index + trials_so_far
    if settings.sampler["kind"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.sampler["n_startup_trials"],
                                      constraints_func=constraint if settings.memory_budget is not None else None)


def make_pruner(settings: SearchSettings):
    import optuna

    p = settings.pruner
    if p["kind"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["n_startup_trials"], n_warmup_steps=p["n_warmup_steps"])
    if p["kind"] == "percentile":
        return optuna.pruners.PercentilePruner(p["percentile"], n_startup_trials=p["n_startup_trials"],
                                               n_warmup_steps=p["n_warmup_steps"])
    if p["kind"] == "threshold":
        return optuna.pruners.ThresholdPruner(upper=float(p["upper"]), n_warmup_steps=p["n_warmup_steps"])
    return optuna.pruners.NopPruner()


def _storage(url: str, settings: SearchSettings, tracking_uri: str):
    """The study's storage, with heartbeats: dead trials are failed, their runs marked KILLED, and retried."""
    return open_storage(url, settings.heartbeat_interval, settings.grace_period,
                        StaleTrialHandler(settings.max_retry, tracking_uri))


def run_worker(spec: WorkerSpec, n_trials: int, worker_index: int = 0) -> None:
    """Run `n_trials` trials of the study (retries of dead trials first) in this process."""
    import optuna

    settings = SearchSettings.from_dict(spec.settings)
    job = build_job(compose(list(spec.train), "train", spec.config_dir))
    storage = _storage(spec.storage, settings, job.tracking.tracking_uri)
    trials_so_far = len(optuna.load_study(study_name=spec.study, storage=storage).trials)
    study = optuna.load_study(study_name=spec.study, storage=storage,
                              sampler=make_sampler(settings, worker_index, trials_so_far), pruner=make_pruner(settings))
    parent = ParentRun.attached(job.tracking, Path(spec.folder), spec.experiment, spec.study, spec.parent_run_id,
                                spec.config_dir)
    with _experimental_allowed():
        study.optimize(Objective(spec, parent), n_trials=n_trials, catch=(TrialOutOfMemory,), gc_after_trial=True)


def _count(study, states: Sequence[str]) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in states)


def _launch(spec: WorkerSpec, folder: Path, remaining: int, workers: int, say: Callable[[str], None]) -> None:
    """Run `remaining` trials: in this process for one worker, else in worker processes."""
    workers = min(workers, remaining)
    if workers <= 1:
        run_worker(spec, remaining, 0)
        return
    path = spec_path(folder)
    path.write_text(json.dumps(spec.to_dict(), indent=1))
    shares = [remaining // workers + (1 if i < remaining % workers else 0) for i in range(workers)]
    env = dict(os.environ)
    # Parallel trials on one machine share its cores: one worker's threads should not crowd another's.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    say(f"moc search: {workers} worker processes, trials {shares}")
    procs = [subprocess.Popen([sys.executable, "-m", "moc_lightning.search.worker", str(path), str(share), str(i)],
                              env=env) for i, share in enumerate(shares)]
    try:
        codes = [proc.wait() for proc in procs]
    except BaseException:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    failed = [(i, code) for i, code in enumerate(codes) if code != 0]
    if failed:
        raise RuntimeError("moc search: worker(s) " + ", ".join(f"{i} (exit {c})" for i, c in failed)
                           + " failed; their output is above. Running the same command again resumes the study.")


def _check_single_device(job) -> None:
    devices, strategy = job.trainer.devices, job.trainer.strategy
    if str(devices) not in ("1",) or strategy not in ("auto", "single_device"):
        raise ConfigError(f"moc search trains each trial on one device (trainer.devices = {devices!r}, trainer.strategy "
                          f"= {strategy!r}): use --workers for trials in parallel")


def run_search(space: str = "moc", scale: str = "smoke", overrides: Sequence[str] = (), n_trials: Optional[int] = None,
               workers: int = 1, storage: Optional[str] = None, study_name: Optional[str] = None,
               config_dir: Optional[str] = None, say: Callable[[str], None] = print) -> SearchOutcome:
    import optuna

    folder_conf = conf_dir(config_dir)
    own, user_train = split_overrides(overrides, "search.")
    raw = load_settings(folder_conf / "search" / f"{space}.yaml", scale, own, f"search space {space}")
    if n_trials is not None:
        raw["n_trials"] = n_trials
    settings = SearchSettings.from_dict(raw)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {workers!r} is not allowed: expected an integer >= 1")
    train = [*settings.train, *settings.variant, *user_train]
    job = build_job(compose(train, "train", str(folder_conf)))
    _check_single_device(job)
    if job.ffn.kind != "moc":
        raise ConfigError(f"moc search searches MoC's K, groups and placement, but the variant is {job.ffn.kind!r}: "
                          "set search.variant=[ffn=moc] (or another MoC variant)")
    memory_metric, memory_unit = settings.memory_metric, ""
    if memory_metric == "auto":
        memory_metric, memory_unit = AUTO_MEMORY["cuda" if torch.cuda.is_available() else "cpu"]
    else:
        memory_unit = "GiB" if memory_metric.endswith("_gb") else "MiB" if memory_metric.endswith("_mb") else "value"
    identity = {k: v for k, v in settings.to_dict().items() if k not in NOT_IDENTIFYING}
    name = study_name or f"{space}-{scale}-{fingerprint(space, scale, identity, train, memory_metric)}"
    experiment = job.tracking.experiment or f"search-{space}-{scale}"
    url = resolve_storage_url(storage)
    folder = Path(job.run_dir).resolve() / "search" / name

    with _experimental_allowed():
        study = optuna.create_study(study_name=name, storage=_storage(url, settings, job.tracking.tracking_uri),
                                    directions=["minimize"] * len(settings.objectives), load_if_exists=True)
        if len(study.directions) != len(settings.objectives):
            raise ConfigError(f"study {name!r} in {url} has {len(study.directions)} objective(s), these settings "
                              f"{len(settings.objectives)}: use another --study")
        known_parent = study.user_attrs.get(PARENT_ATTR)
        if known_parent and read_run_id(folder) is None:  # another machine opened the parent: join it
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RUN_ID_FILE).write_text(known_parent + "\n")
        say(f"moc search: study {name!r} in {url}: {_count(study, FINISHED_STATES)} of {settings.n_trials} trials "
            f"finished; objectives {list(settings.objectives)} (memory: {memory_metric}, {memory_unit})")
        tags = {"moc.role": "parent", "moc.search": space, "moc.scale": scale, "optuna.study": name}
        with ParentRun(job.tracking, folder, experiment, name, tags, str(folder_conf), say) as parent:
            study.set_user_attr(PARENT_ATTR, parent.run_id)
            study.set_user_attr("moc.experiment", experiment)
            study.set_user_attr("moc.memory_metric", memory_metric)
            parent.log_text(json.dumps({"settings": settings.to_dict(), "train": train, "storage": url}, indent=1),
                            "search_settings.json")
            spec = WorkerSpec(url, name, settings.to_dict(), train, experiment, parent.run_id, str(folder),
                              str(folder_conf), memory_metric, memory_unit, job.model.d_ffn)
            optuna.storages.fail_stale_trials(study)  # trials of a killed invocation, once their grace period is over
            for _ in range(3):
                remaining = settings.n_trials - _count(study, FINISHED_STATES)
                if remaining <= 0:
                    break
                _launch(spec, folder, remaining, workers, say)
                optuna.storages.fail_stale_trials(study)
                if _count(study, ("WAITING",)) == 0:  # no dead trial was queued again
                    break
            rows = trial_rows(study, memory_unit, settings)
            best = best_rows(rows, settings)
            parent.log_table(rows, "trials")
            parent.log_table(best, "pareto_front" if settings.multi_objective else "best")
            for figure_name, figure in figures(rows, settings, memory_unit, name).items():
                parent.log_figure(figure, figure_name)
            _say_summary(say, rows, best, settings, memory_unit, name, parent.run_id, experiment)
            return SearchOutcome(name, url, experiment, parent.run_id, rows, best)


def _say_summary(say, rows, best, settings, memory_unit, name, parent_run_id, experiment) -> None:
    states = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    columns = ["trial", "state", "group", "placement", "k", "val_ppl", f"memory_{memory_unit}"]
    say(f"\nmoc search: study {name!r}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    title = "Pareto front (perplexity vs memory)" if settings.multi_objective else "best trial"
    none = "(no complete trial within the memory budget)" if settings.memory_budget is not None else "(no complete trial)"
    say(f"{title}:\n{table_markdown([{c: r.get(c) for c in columns} for r in best]) if best else none}")
    say(f"moc search: parent run {parent_run_id} in experiment {experiment!r}; artifacts: trials.md/.csv, "
        f"{'pareto_front' if settings.multi_objective else 'best'}.md/.csv, search_history.png, pareto_front.png")
