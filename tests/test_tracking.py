"""MLflow tracking: URIs, one run per job (resumable), what a run records, and the table notebooks read.

Every test writes into an SQLite store under pytest's tmp folder; experiments are named per test so
that one store can serve the module (creating a store runs MLflow's migrations, which takes a while).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import lightning.pytorch as pl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from moc_lightning.ffn import FFNConfig  # noqa: E402
from moc_lightning.tracking import (  # noqa: E402
    RUN_ID_FILE,
    ConfigChangedError,
    TrackingConfig,
    finish_run,
    log_config,
    log_figure,
    log_final_metrics,
    log_table,
    log_text_artifact,
    open_run,
    resolve_tracking_uri,
    runs_table,
    standard_tags,
    tracked_run,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TrackingConfig:
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    return TrackingConfig(tracking_uri=f"sqlite:///{db}")


@pytest.fixture(scope="module")
def client(store) -> MlflowClient:
    return MlflowClient(store.tracking_uri)


def runs_of(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def read_artifact(client: MlflowClient, run_id: str, name: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, name, str(tmp_path))).read_text()


# ------------------------------------------------------------------------------------------ URIs


def test_relative_sqlite_uri_becomes_absolute(tmp_path):
    (tmp_path / "notebooks").mkdir()
    from_root = resolve_tracking_uri("sqlite:///mlflow.db", workdir=tmp_path)
    from_notebook = resolve_tracking_uri("sqlite:///../mlflow.db", workdir=tmp_path / "notebooks")
    assert from_root == from_notebook == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(from_root) == from_root  # absolute stays as it is
    assert resolve_tracking_uri("sqlite:///a.db?timeout=20", workdir=tmp_path).endswith("/a.db?timeout=20")


def test_default_uri_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, workdir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    assert resolve_tracking_uri(None, workdir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/team.db"
    monkeypatch.chdir(tmp_path)
    assert TrackingConfig().tracking_uri == f"sqlite:///{tmp_path.resolve()}/team.db"
    for remote in ("http://mlflow.example:5000", "https://x.example", "postgresql+psycopg2://u@h/db", "mysql://u@h/db"):
        assert resolve_tracking_uri(remote) == remote


@pytest.mark.parametrize("uri", ["file:./mlruns", "file:///tmp/mlruns", "./mlruns", "/tmp/mlruns", "mlruns"])
def test_file_store_is_refused(uri, tmp_path):
    with pytest.raises(ValueError, match=r"file store no longer starts.*sqlite:///"):
        resolve_tracking_uri(uri, workdir=tmp_path)


def test_tracking_config_is_validated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"TrackingConfig\.tracking_uri.*file store no longer starts"):
        TrackingConfig(tracking_uri="file:./mlruns")
    with pytest.raises(ValueError, match=r"TrackingConfig\.enabled = 'yes'.*true or false"):
        TrackingConfig(enabled="yes")
    with pytest.raises(ValueError, match=r"TrackingConfig\.experiment = ''"):
        TrackingConfig(experiment="")
    with pytest.raises(ValueError, match=r"TrackingConfig\.tracking_uri.*in-memory"):
        TrackingConfig(tracking_uri="sqlite:///:memory:")
    cfg = TrackingConfig(tracking_uri="sqlite:///sub/x.db", artifact_location="arts")
    assert cfg.artifact_location == str(tmp_path.resolve() / "arts")
    assert not (tmp_path / "sub").exists()  # building a config creates nothing


# -------------------------------------------------------------------------------------------- runs


def test_open_run_creates_one_run_and_a_restart_reopens_it(store, client, tmp_path):
    run_dir = tmp_path / "run"
    logger = open_run(store, run_dir, "open-once", "first", {"x": 1})
    runs = runs_of(client, "open-once")
    assert [r.info.run_id for r in runs] == [logger.run_id]
    assert (run_dir / RUN_ID_FILE).read_text().strip() == logger.run_id
    assert runs[0].info.run_name == "first" and runs[0].data.tags["x"] == "1"
    # artifacts live beside the database, not in the working directory
    assert runs[0].info.artifact_uri.startswith(str(store.sqlite_path.parent))

    finish_run(logger, "KILLED")
    assert client.get_run(logger.run_id).info.status == "KILLED"
    again = open_run(store, run_dir, "open-once", "first", {"x": 2})
    assert again.run_id == logger.run_id
    run = client.get_run(logger.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["x"] == "2"
    assert len(runs_of(client, "open-once")) == 1
    finish_run(again, "FINISHED")


def test_a_restart_into_another_experiment_is_refused(store, client, tmp_path):
    logger = open_run(store, tmp_path, "exp-one", None, {})
    finish_run(logger, "FINISHED")
    with pytest.raises(ValueError, match=r"experiment 'exp-one'.*asks for experiment 'exp-two'"):
        open_run(store, tmp_path, "exp-two", None, {})
    assert runs_of(client, "exp-two") == []
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_disabled_tracking_creates_nothing(tmp_path):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/off.db", enabled=False)
    with tracked_run(cfg, tmp_path / "run", "off", None, {}) as logger:
        assert logger is None
        log_config(logger, {"a": 1}, "a: 1\n")
        log_final_metrics(logger, {"m": 1.0})
    assert not (tmp_path / "off.db").exists() and not (tmp_path / "run").exists()


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_metrics_reach_mlflow_with_their_steps(store, client, tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    with tracked_run(store, tmp_path / "run", "trainer", "tiny", {}) as logger:
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=3, logger=logger, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        )
        trainer.fit(TinyModule(), torch.utils.data.DataLoader(data, batch_size=4))
        log_final_metrics(logger, {"final": {"train_loss": trainer.callback_metrics["train/loss"]}}, step=3)
    history = client.get_metric_history(logger.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    run = client.get_run(logger.run_id)
    assert run.data.metrics["final.train_loss"] == pytest.approx(history[-1].value, rel=1e-6)
    assert run.info.status == "FINISHED"


# ------------------------------------------------------------------------------- what a run records

CONFIG = {
    "model": {"name": "llama_60m", "d_model": 64, "ffn": {"kind": "moc", "k": 32, "group": None}},
    "optim": {"lr": 1e-3, "betas": [0.9, 0.95]},
    "notes": "x" * 7000,
}
CONFIG_YAML = "model:\n  name: llama_60m\n  d_model: 64\noptim:\n  lr: 0.001\n"


def test_config_params_artifacts_and_resume(store, client, tmp_path):
    run_dir = tmp_path / "run"
    logger = open_run(store, run_dir, "config", "cfg", {})
    log_config(logger, CONFIG, CONFIG_YAML)
    log_text_artifact(logger, "LlamaForCausalLM\n  12.3 M params\n", "model_summary.txt")
    params = client.get_run(logger.run_id).data.params
    assert params["model.ffn.kind"] == "moc" and params["model.ffn.k"] == "32"
    assert params["model.ffn.group"] == "None" and params["optim.betas"] == "[0.9, 0.95]"
    assert params["optim.lr"] == "0.001" and len(params["notes"]) == 6000
    assert read_artifact(client, logger.run_id, "config.yaml", tmp_path / "a") == CONFIG_YAML
    assert read_artifact(client, logger.run_id, "model_summary.txt", tmp_path / "b").startswith("LlamaForCausalLM")
    finish_run(logger, "KILLED")

    # a restart with the same config logs into the same run, skipping what it already has
    again = open_run(store, run_dir, "config", "cfg", {})
    log_config(again, CONFIG, CONFIG_YAML)
    assert again.run_id == logger.run_id
    finish_run(again, "KILLED")

    # a restart with a changed config is refused, and the run is left as the restart found it
    changed = {**CONFIG, "optim": {"lr": 3e-4, "betas": [0.9, 0.95]}}
    with pytest.raises(ConfigChangedError, match=r"(?s)config changed since.*optim\.lr: run has '0\.001', config now '0\.0003'"):
        with tracked_run(store, run_dir, "config", "cfg", {}) as resumed:
            log_config(resumed, changed, CONFIG_YAML)
    assert client.get_run(logger.run_id).info.status == "KILLED"
    assert client.get_run(logger.run_id).data.params["optim.lr"] == "0.001"


def test_standard_tags_reach_the_run(store, client, tmp_path):
    tags = standard_tags(dataclasses.asdict(FFNConfig(kind="moc", d_model=64, d_ffn=172, group="2:8")), "llama_60m")
    assert tags == standard_tags(FFNConfig(kind="moc", d_model=64, d_ffn=172, group="2:8"), "llama_60m")
    with tracked_run(store, tmp_path, "tags", None, tags) as logger:
        pass
    got = client.get_run(logger.run_id).data.tags
    assert got["ffn.kind"] == "moc" and got["ffn.k"] == "32" and got["ffn.group"] == "2:8"
    assert got["ffn.placement"] == "pre_silu" and got["model.size"] == "llama_60m"
    assert re.fullmatch(r"[0-9a-f]{40}", got["git.commit"]), got["git.commit"]
    assert got["mlflow.source.git.commit"] == got["git.commit"]
    assert standard_tags({"kind": "swiglu", "k": 4, "group": None, "placement": "pre_silu"}, "m")["ffn.group"] == "none"


def test_tables_figures_and_final_metrics(store, client, tmp_path):
    rows = [{"ffn": "moc", "ppl": 12.3456789}, {"ffn": "swiglu", "ppl": 11.0, "note": "a|b"}]
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    with tracked_run(store, tmp_path, "tables", None, {}) as logger:
        log_table(logger, rows, "ablation")
        log_figure(logger, fig, "loss")
        log_final_metrics(logger, {"peak_memory": {"gib": 1.5}, "val_ppl": torch.tensor(3.25)})
        with pytest.raises(ValueError, match="not a number"):
            log_final_metrics(logger, {"bad": "high"})
    plt.close(fig)
    names = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"ablation.md", "ablation.csv", "loss.png"} <= names
    table = read_artifact(client, logger.run_id, "ablation.md", tmp_path / "md")
    assert table.splitlines()[0] == "| ffn | ppl | note |" and "| moc | 12.3457 |  |" in table and "a\\|b" in table
    parsed = list(csv.DictReader(io.StringIO(read_artifact(client, logger.run_id, "ablation.csv", tmp_path / "csv"))))
    assert parsed == [{"ffn": "moc", "ppl": "12.3456789", "note": ""}, {"ffn": "swiglu", "ppl": "11.0", "note": "a|b"}]
    metrics = client.get_run(logger.run_id).data.metrics
    assert metrics == {"peak_memory.gib": 1.5, "val_ppl": 3.25}


# ------------------------------------------------------------------------------------ run statuses


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_tracked_run_marks_the_run_when_the_job_fails(store, client, tmp_path, error, status):
    experiment = f"fails-{status}"
    with pytest.raises(type(error)):
        with tracked_run(store, tmp_path, experiment, None, {}) as logger:
            raise error
    assert client.get_run(logger.run_id).info.status == status
    assert [r.info.status for r in runs_of(client, experiment)] == [status]
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        finish_run(logger, "DONE")


def test_nested_run_and_runs_table(store, client, tmp_path):
    with tracked_run(store, tmp_path / "parent", "sweep", "search", {}) as parent:
        for trial in range(2):
            with tracked_run(store, tmp_path / f"t{trial}", "sweep", f"trial-{trial}", {"trial": trial},
                             parent_run_id=parent.run_id) as child:
                log_config(child, {"ffn": {"k": 8 * (trial + 1)}}, "")
                log_final_metrics(child, {"val_ppl": 10.0 + trial})
        with pytest.raises(ValueError, match="parent_run_id"):
            open_run(store, tmp_path / "orphan", "sweep", "orphan", {}, parent_run_id="0" * 32)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id

    rows = runs_table(store.tracking_uri, "sweep")
    assert [r["run_name"] for r in rows] == ["search", "trial-0", "trial-1"]
    assert all(r["status"] == "FINISHED" for r in rows)
    assert rows[1]["parent_run_id"] == parent.run_id and rows[0]["parent_run_id"] is None
    assert rows[2]["params.ffn.k"] == "16" and rows[2]["metrics.val_ppl"] == 11.0 and rows[2]["tags.trial"] == "1"
    with pytest.raises(ValueError, match="no experiment named 'nope'.*sweep"):
        runs_table(store.tracking_uri, "nope")


def test_no_run_is_left_running(store, client):
    running = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
               if r.info.status == "RUNNING"]
    assert running == []
