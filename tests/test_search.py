"""`moc search`: a 6-trial smoke study with 2 worker processes on one SQLite file, every trial an MLflow
child run; a study built to prune prunes; a killed study resumes, retrying its dead trial from that
trial's checkpoint; settings are validated; the Pareto front is the set no point dominates."""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

import smoke_results
from moc_lightning.cli.config import ConfigError
from moc_lightning.cli.main import main
from moc_lightning.search import SearchSettings, pareto_indices, run_search
from moc_lightning.search.storage import resolve_storage_url
from moc_lightning.sweep import children_rows
from moc_lightning.tracking import runs_table


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> smoke_results.SmokeStore:
    return smoke_results.search(tmp_path_factory)


def test_six_trials_two_workers_one_sqlite_file_every_trial_in_mlflow(smoke, tmp_path):
    outcome = smoke.search
    study = optuna.load_study(study_name=outcome.study, storage=smoke.storage)
    states = [t.state.name for t in study.trials]
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 6 and "RUNNING" not in states, states
    assert len(outcome.best) == 1 and outcome.best[0]["state"] == "COMPLETE"
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert outcome.best[0]["trial"] == best.number and outcome.best[0]["val_ppl"] == pytest.approx(best.value)

    children = children_rows(smoke.tracking_uri, outcome.experiment, outcome.parent_run_id)
    by_id = {c["run_id"]: c for c in children}
    # one run per trial, except that a trial repeating a trained point reuses that point's run
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(by_id)
    assert len(children) == sum("repeat_of" not in t.user_attrs for t in study.trials)
    for trial in study.trials:  # each trial is one child run with its params, its result and its state
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        assert child["status"] == "FINISHED" and child["tags.optuna.state"] == trial.state.name
        assert child["params.trial.group"] == trial.params["group"]
        assert child["params.trial.placement"] == trial.params["placement"]
        # what the run trained with (its FFN's tags, from the resolved config)
        assert child["tags.ffn.placement"] == trial.params["placement"] and child["tags.ffn.kind"] == "moc"
        assert child["tags.ffn.group"] == trial.params["group"]
        if trial.params["group"] == "none":
            assert int(child["tags.ffn.k"]) == round(trial.params["k_fraction"] * 172)  # llama-tiny's d_ffn
        assert trial.user_attrs["ppl"] == pytest.approx(child["metrics.final/val/ppl"])
        assert trial.user_attrs["memory"] == pytest.approx(child["metrics.activation/measured_mb"])
    files = {a.path for a in MlflowClient(smoke.tracking_uri).list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "trials.md", "best.csv", "search_history.png", "pareto_front.png"} <= files
    parent = next(r for r in runs_table(smoke.tracking_uri, outcome.experiment) if r["run_id"] == outcome.parent_run_id)
    assert parent["status"] == "FINISHED" and parent["tags.moc.role"] == "parent"


def test_a_study_built_to_prune_prunes(smoke, tmp_path):
    # Every perplexity is far above 1, so the threshold pruner stops each trial at its first validation.
    overrides = ["search.pruner.kind=threshold", "search.pruner.upper=1.0", *smoke.overrides(tmp_path)]
    with smoke_results.one_thread():
        outcome = run_search("moc", "smoke", overrides, n_trials=2, storage=f"sqlite:///{tmp_path}/optuna.db")
    pruned = [r for r in outcome.trials if r["state"] == "PRUNED"]
    assert len(pruned) == 2 and outcome.best == []
    runs = {r["run_id"]: r for r in runs_table(f"sqlite:///{tmp_path}/mlflow.db", outcome.experiment)}
    for row in pruned:
        assert row["last_reported_step"] == 4  # the first validation, of 8 steps
        run = runs[row["run_id"]]
        assert run["tags.optuna.state"] == "PRUNED" and run["status"] == "FINISHED"
        assert run["metrics.train/tokens_seen"] == 4 * 4 * 64  # stopped after step 4: half the budget


def test_a_point_already_trained_is_not_trained_again(smoke, tmp_path):
    overrides = ["search.space.group=['2:8']", "search.space.placement=[pre_silu]", *smoke.overrides(tmp_path)]
    with smoke_results.one_thread():
        outcome = run_search("moc", "smoke", overrides, n_trials=2, storage=f"sqlite:///{tmp_path}/optuna.db")
    first, second = outcome.trials
    assert first["state"] == second["state"] == "COMPLETE" and second["repeat_of"] == 0
    assert second["val_ppl"] == first["val_ppl"] and second["run_id"] == first["run_id"]
    assert [r["run_name"] for r in runs_table(f"sqlite:///{tmp_path}/mlflow.db", outcome.experiment)] == [
        outcome.study, "trial-0000"]


def test_killed_study_resumes_and_retries_its_dead_trial(smoke, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    command = ["search", "--n-trials", "3", "--storage", storage, *smoke.overrides(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "moc_lightning.cli.main", *command], env=smoke_results.subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_at, checkpoints = time.time() + 300, None, []
    while time.time() < deadline and proc.poll() is None:
        # kill once trial 0 is complete and trial 1 has a checkpoint to resume from
        done = list(tmp_path.glob("runs/search/*/*/trial-0000/checkpoints/step8.ckpt"))
        checkpoints = [p.name for p in tmp_path.glob("runs/search/*/*/trial-0001/checkpoints/*.ckpt")]
        if done and "last.ckpt" in checkpoints:  # what a restart resumes from
            proc.send_signal(signal.SIGKILL)
            killed_at = time.time()
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "the study did not reach its second trial's checkpoint"
    name = optuna.get_all_study_names(storage)[0]
    assert [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials][:2] == ["COMPLETE", "RUNNING"]
    time.sleep(max(0.0, killed_at + 4.5 - time.time()))  # the smoke scale's grace period: 4 s without a heartbeat

    with smoke_results.one_thread():
        assert main(command) == 0
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.trials
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 3
    assert trials[1].state.name == "FAIL"
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == trials[1].params and retry.state.name in ("COMPLETE", "PRUNED")
    runs = {r["run_name"]: r for r in runs_table(f"sqlite:///{tmp_path}/mlflow.db", "search-moc-smoke")}
    assert all(r["status"] == "FINISHED" for r in runs.values())
    if "step8.ckpt" not in checkpoints:  # killed mid-training: the dead trial's run continued from step 4
        assert runs["trial-0001"]["tags.moc.outcome"] == "resumed"
    assert runs["trial-0001"]["run_id"] == retry.user_attrs["mlflow_run_id"]
    # the parent, and a run per trial (the dead trial's is its retry's; a repeated point reuses its run)
    assert len(runs) == 1 + len([t for t in trials if t.state.name != "FAIL" and "repeat_of" not in t.user_attrs])


def test_pareto_front_is_the_non_dominated_set():
    rng = random.Random(0)
    points = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(40)]
    front = set(pareto_indices(points))
    for i, p in enumerate(points):
        beaten = any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)
        assert (i in front) == (not beaten)
    assert pareto_indices([(1, 1), (1, 1)]) == [0, 1]  # ties dominate neither


def test_multi_objective_study_reports_the_pareto_front():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for memory, ppl in itertools.product([1.0, 2.0, 3.0], [30.0, 20.0]):
        study.add_trial(optuna.create_trial(values=[ppl, memory], params={}, distributions={},
                                            user_attrs={"ppl": ppl, "memory": memory}))
    from moc_lightning.search.report import best_rows, trial_rows

    settings = SearchSettings.from_dict({"objectives": ["ppl", "memory"], "space": {"group": ["2:8"]}})
    rows = trial_rows(study, "GiB", settings)
    assert [(r["memory_GiB"], r["val_ppl"]) for r in best_rows(rows, settings)] == [(1.0, 20.0)]
    assert {t.number for t in study.best_trials} == {r["trial"] for r in rows if r["pareto"]}


@pytest.mark.parametrize("settings, words", [
    ({"objectives": ["ppl", "speed"]}, ["search.objectives", "[ppl] or [ppl, memory]"]),
    ({"objectives": ["ppl", "memory"], "memory_budget": 4}, ["memory_budget", "single objective"]),
    ({"space": {"group": ["3:2"]}}, ["search.space.group", "a = 3 must be <= b = 2"]),
    ({"space": {"group": [128]}}, ["search.space.group", "quote a:b groups"]),
    ({"space": {"group": ["none"]}}, ["exactly one of k_fraction or k"]),
    ({"space": {"group": ["none"], "k_fraction": {"low": 0.5, "high": 2.0}}}, ["space.k_fraction", "<= 1.0"]),
    ({"space": {"group": ["2:8"], "placement": ["middle"]}}, ["search.space.placement", "pre_silu"]),
    ({"space": {"group": ["2:8"]}, "pruner": {"kind": "threshold"}}, ["pruner.upper"]),
    ({"space": {"group": ["2:8"]}, "heartbeat_interval": 10, "grace_period": 5}, ["grace_period", "heartbeat_interval"]),
])
def test_bad_settings_are_refused_by_name(settings, words):
    with pytest.raises(ConfigError) as info:
        SearchSettings.from_dict(settings)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("argv, words", [
    (["search", "--scale", "huge"], ["no scale 'huge'", "smoke"]),
    (["search", "search.nope=1"], ["nope"]),
    (["search", "--workers", "0"], ["--workers 0"]),
    (["search", "--storage", "sqlite:///:memory:"], ["in-memory"]),
    (["search", "ffn=swiglu"], ["search.variant"]),
])
def test_bad_command_line_is_one_paragraph(tmp_path, capsys, argv, words):
    code = main([*argv, f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"run_dir={tmp_path}/runs"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and err.startswith("moc search: error:") and "Traceback" not in err, err
    for word in words:
        assert word in err
    assert not (tmp_path / "mlflow.db").exists()


def test_storage_urls(tmp_path):
    assert resolve_storage_url(None, tmp_path) == f"sqlite:///{tmp_path}/optuna.db"
    assert resolve_storage_url("sqlite:///s.db", tmp_path) == f"sqlite:///{tmp_path}/s.db"
    assert resolve_storage_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ConfigError, match="SQLAlchemy URL"):
        resolve_storage_url("optuna.db")
