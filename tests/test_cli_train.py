"""`moc train`, end to end on CPU: the main job, real text, bad input, kill-and-resume, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moc_lightning.cli.main import main
from moc_lightning.tracking import runs_table

REQUIRED_METRICS = ["train/loss", "val/loss", "val/ppl", "train/tokens_seen", "activation/measured_mb",
                    "activation/analytic_mb"]
MEMORY = "memory/peak_rss_gb"
TOKENS_PER_SEC = "train/device/items_per_sec"
FAST = ["trainer.val_every_n_steps=4", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "trainer.monitor_every_n_steps=2", "trainer.checkpoint_every_n_steps=4", "trainer.progress_bar=false"]


def tracking(tmp_path: Path) -> list[str]:
    return [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"run_dir={tmp_path}/runs",
            f"data.cache_dir={tmp_path}/cache"]


def runs(tmp_path: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return [row for exp in client.search_experiments() for row in runs_table(f"sqlite:///{tmp_path}/mlflow.db", exp.name)]


def assert_all_metrics(row: dict):
    metrics = {k[len("metrics."):] for k in row if k.startswith("metrics.") and row[k] is not None}
    missing = [m for m in REQUIRED_METRICS + [MEMORY, TOKENS_PER_SEC] if m not in metrics]
    assert not missing, f"missing metrics {missing}; logged: {sorted(metrics)}"
    assert row["status"] == "FINISHED"


def test_main_job_defaults_on_embedded_data(tmp_path, monkeypatch):
    """The README's main job (defaults: embedded corpus, llama-small, MoC), shortened."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "trainer.max_steps=8", *FAST, *tracking(tmp_path)]) == 0
    (row,) = runs(tmp_path)
    assert_all_metrics(row)
    assert row["tags.ffn.kind"] == "moc" and row["tags.model.size"] == "llama-small"
    assert row["params.data.source"] == "embedded"


def test_real_c4_sample_moc_and_dense(tmp_path, shared_data):
    common = ["model=llama-tiny", "data=c4-sample", f"data.paths=[{shared_data}/c4-en-sample-1000.json.gz]",
              f"data.tokenizer={shared_data}/t5-tokenizer", "data.seq_len=64", "data.batch_size=4",
              "data.max_documents=200", "trainer.max_steps=8", *FAST, *tracking(tmp_path)]
    for ffn in ("moc", "swiglu"):
        assert main(["train", f"ffn={ffn}", *common]) == 0
    rows = runs(tmp_path)
    assert sorted(r["tags.ffn.kind"] for r in rows) == ["moc", "swiglu"]
    for row in rows:
        assert_all_metrics(row)
        assert float(row["params.model.vocab_size"]) >= 32000  # the T5 tokenizer's
    moc, dense = sorted(rows, key=lambda r: r["tags.ffn.kind"])
    assert moc["metrics.activation/ffn_mb"] < 0.5 * dense["metrics.activation/ffn_mb"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data=c4-sample", "data.paths=[/nonexistent/c4.json.gz]"], ["/nonexistent/c4.json.gz"]),
        (["trainer.no_such_key=1"], ["no_such_key"]),
        (["ffn=moc_9-4"], ["moc_9-4"]),
        (["ffn.k=100000"], ["FFNConfig.k = 100000", "d_ffn = 688"]),
        (["ffn.placement=sideways"], ["placement", "sideways"]),
    ],
)
def test_bad_input_gets_one_clear_paragraph_and_no_running_run(tmp_path, capsys, overrides, words):
    code = main(["train", *overrides, "trainer.max_steps=2", *tracking(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped for the terminal
    assert code == 2
    assert err.startswith("moc train: error:") and "Traceback" not in err
    for word in words:
        assert word in err
    assert not Path(tmp_path / "mlflow.db").exists() or all(r["status"] != "RUNNING" for r in runs(tmp_path))


def test_malformed_json_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    code = main(["train", "data=c4-sample", f"data.paths=[{bad}]", "trainer.max_steps=2", *tracking(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "bad.jsonl" in err and "line 3" in err and "Traceback" not in err


def _moc(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "moc_lightning.cli.main", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_run_resumes_into_the_same_mlflow_run(tmp_path):
    cmd = ["experiment=smoke", "trainer.max_steps=40", "trainer.checkpoint_every_n_steps=5",
           "trainer.log_every_n_steps=1", "trainer.progress_bar=false", *tracking(tmp_path)]
    first = _moc(*cmd)
    ckpt_dir = None
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        found = list(Path(tmp_path / "runs").glob("*/*/checkpoints/step1[05].ckpt"))
        if found:
            ckpt_dir = found[0].parent
            break
        time.sleep(0.2)
    assert ckpt_dir is not None, "no checkpoint appeared: " + (first.stdout.read() if first.poll() is not None else "")
    first.send_signal(signal.SIGKILL)
    first.wait()
    (row,) = runs(tmp_path)
    assert row["status"] == "RUNNING"  # killed: nothing could mark it
    second = _moc(*cmd)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    (row_after,) = runs(tmp_path)
    assert row_after["run_id"] == row["run_id"] and row_after["status"] == "FINISHED"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(row["run_id"], "train/loss")
    steps = sorted({m.step for m in history})
    assert steps[-1] >= 39 and len(steps) >= 38  # every step logged once the resumed run ends


def test_ddp_two_processes_on_cpu(tmp_path):
    proc = _moc("experiment=smoke", "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=6",
                "trainer.progress_bar=false", *tracking(tmp_path))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    (row,) = runs(tmp_path)  # one run, not one per rank
    assert row["status"] == "FINISHED" and row["metrics.train/loss"] is not None
