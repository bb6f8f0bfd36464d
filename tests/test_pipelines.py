"""`moc pipeline`: every pipeline's smoke scale leaves its parent and children, tables and plots in
MLflow; the numbers in its tables are checked against what the children logged and against what
must hold (same token budget, MoC saving FFN activations, memory linear in K and batch); a killed
pipeline re-run trains only what was missing; running out of memory ends a variant's climb."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from mlflow.tracking import MlflowClient

import smoke_results
from moc_lightning.cli.main import main
from moc_lightning.sweep import children_rows, latest_parent
from moc_lightning.tracking import runs_table

MAIN_TABLE = {"profile": "memory_breakdown"}
FIGURES = {"compare": ["compare.png"], "placement": ["placement.png"], "k-sweep": ["k_sweep.png"],
           "batch-scaling": ["batch_scaling.png"],
           "profile": ["memory_breakdown.png", "gate_histograms_swiglu.png", "gate_histograms_moc.png"]}


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> smoke_results.SmokeStore:
    return smoke_results.pipelines(tmp_path_factory)


def artifact_text(uri: str, run_id: str, path: str, tmp: Path) -> str:
    return Path(MlflowClient(uri).download_artifacts(run_id, path, str(tmp))).read_text()


def table(uri: str, run_id: str, name: str, tmp: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(artifact_text(uri, run_id, f"{name}.csv", tmp))))


@pytest.mark.parametrize("name", smoke_results.PIPELINES)
def test_smoke_scale_leaves_parent_children_table_and_plots(smoke, name, tmp_path):
    outcome = smoke.outcomes[name]
    parent = latest_parent(smoke.tracking_uri, outcome.experiment, moc__pipeline=name)
    assert parent["run_id"] == outcome.parent_run_id and parent["status"] == "FINISHED"
    assert parent["tags.moc.scale"] == "smoke"
    children = children_rows(smoke.tracking_uri, outcome.experiment, parent["run_id"])
    assert len(children) == smoke_results.EXPECTED_CHILDREN[name]
    assert all(c["status"] == "FINISHED" and c["tags.moc.pipeline"] == name for c in children)
    assert all(c["metrics.val/ppl"] > 1 and math.isfinite(c["metrics.val/ppl"]) for c in children)

    files = {a.path for a in MlflowClient(smoke.tracking_uri).list_artifacts(parent["run_id"])}
    main_table = MAIN_TABLE.get(name, "results")
    assert {f"{main_table}.md", f"{main_table}.csv", *FIGURES[name]} <= files, files
    for figure in FIGURES[name]:
        assert (Path(MlflowClient(smoke.tracking_uri).download_artifacts(parent["run_id"], figure, str(tmp_path)))
                .read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    if name != "profile":
        rows = table(smoke.tracking_uri, parent["run_id"], "results", tmp_path)
        by_run = {c["run_id"]: c for c in children}
        assert sorted(r["run_id"] for r in rows) == sorted(by_run)
        for row in rows:  # the table holds what each child logged
            child = by_run[row["run_id"]]
            assert float(row["val_ppl"]) == pytest.approx(child["metrics.final/val/ppl"], rel=1e-6)
            assert float(row["activation_mb"]) == pytest.approx(child["metrics.activation/measured_mb"], rel=1e-6)
            assert float(row["tokens_per_s"]) > 0 and float(row["peak_memory_gb"]) > 0


def test_compare_same_token_budget_and_moc_saves_ffn_activations(smoke, tmp_path):
    outcome = smoke.outcomes["compare"]
    rows = {r["variant"]: r for r in table(smoke.tracking_uri, outcome.parent_run_id, "results", tmp_path)}
    assert list(rows) == ["swiglu", "moc", "moc_2-8", "relu", "drelu", "backrazor", "swiglu_gcp", "moc_gcp"]
    assert len({r["tokens"] for r in rows.values()}) == 1  # 8 steps x 4 x 64 tokens for every variant
    assert float(rows["swiglu"]["tokens"]) == 8 * 4 * 64
    assert float(rows["swiglu"]["ppl_vs_ref"]) == 1.0
    # llama-tiny: d 64, d_ffn 172, K 32. Per token and layer, dense SwiGLU saves X, G, U, S, Z (d + 4 d_ffn
    # floats), MoC X and K values of G and U plus K int16 indices (Table 1 with recompute).
    dense_ffn, moc_ffn = float(rows["swiglu"]["ffn_activation_mb"]), float(rows["moc"]["ffn_activation_mb"])
    tokens_layers = 4 * 64 * 2
    assert dense_ffn * 2**20 == pytest.approx(tokens_layers * (64 + 4 * 172) * 4)
    assert moc_ffn * 2**20 == pytest.approx(tokens_layers * ((64 + 2 * 32) * 4 + 32 * 2))
    assert float(rows["moc"]["ffn_activation_mb"]) < float(rows["moc_2-8"]["ffn_activation_mb"]) < dense_ffn
    assert rows["moc"]["ffn"] == "moc_k32" and rows["moc_gcp"]["ffn"] == "moc_k32+gcp"


def test_k_sweep_memory_grows_linearly_with_k(smoke, tmp_path):
    rows = table(smoke.tracking_uri, smoke.outcomes["k-sweep"].parent_run_id, "results", tmp_path)
    swept = sorted((int(r["k"]), float(r["ffn_activation_mb"]), float(r["ffn_activation_analytic_mb"]))
                   for r in rows if r["k"])
    assert [k for k, _, _ in swept] == [8, 32, 64]  # k_over_d_model 1/8, 1/2, 1 of d_model 64
    for k, measured, analytic in swept:
        assert measured == pytest.approx(analytic)
        assert measured * 2**20 == pytest.approx(4 * 64 * 2 * ((64 + 2 * k) * 4 + 2 * k))
    assert {r["variant"] for r in rows if not r["k"]} == {"swiglu"}


def test_batch_scaling_activation_memory_is_linear_in_batch(smoke, tmp_path):
    outcome = smoke.outcomes["batch-scaling"]
    rows = table(smoke.tracking_uri, outcome.parent_run_id, "results", tmp_path)
    for variant in ("swiglu", "moc"):
        mine = {int(r["batch_size"]): float(r["activation_mb"]) for r in rows if r["variant"] == variant}
        assert sorted(mine) == [2, 4, 8]
        assert mine[8] == pytest.approx(4 * mine[2], rel=0.02) and mine[4] == pytest.approx(2 * mine[2], rel=0.02)
    largest = table(smoke.tracking_uri, outcome.parent_run_id, "largest_batch", tmp_path)
    assert {(r["variant"], r["largest_batch_that_fits"], r["ran_out_of_memory"]) for r in largest} == {
        ("swiglu", "8", "False"), ("moc", "8", "False")}


def test_profile_breakdown_and_gate_histograms(smoke, tmp_path):
    outcome = smoke.outcomes["profile"]
    rows = table(smoke.tracking_uri, outcome.parent_run_id, "memory_breakdown", tmp_path)
    ffn = {r["variant"]: (float(r["analytic_mb"]), float(r["measured_mb"])) for r in rows if r["part"] == "activation: ffn"}
    assert set(ffn) == {"swiglu", "moc"}
    for analytic, measured in ffn.values():
        assert measured == pytest.approx(analytic)
    assert ffn["moc"][1] < 0.25 * ffn["swiglu"][1]
    weights = next(float(r["analytic_mb"]) for r in rows if r["part"] == "weights" and r["variant"] == "moc")
    assert weights * 2**20 == pytest.approx(4 * (2 * 4096 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172 + 2 * 64) + 64))

    histograms = json.loads(artifact_text(smoke.tracking_uri, outcome.parent_run_id, "gate_histograms.json", tmp_path))
    assert set(histograms) == {"swiglu", "moc"}
    for layers in histograms.values():
        assert set(layers) == {"0", "1"}
        for layer in layers.values():
            for which in ("pre", "post"):
                h = layer[which]
                assert sum(h["counts"]) == 4 * 64 * 172  # every gate value of the held-out batch
                assert len(h["edges"]) == len(h["counts"]) + 1 == 81
                assert 0.0 < h["negative_fraction"] < 1.0
            assert layer["post"]["edges"][0] >= -0.2785  # SiLU's minimum is -0.27846
            # SiLU is increasing above its minimum: the top 30% keep their order through it
            top = layer["pre"]["top30_threshold"]
            assert layer["post"]["top30_threshold"] == pytest.approx(top / (1 + math.exp(-top)), rel=0.05, abs=1e-3)


def _moc(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moc_lightning.cli.main", *args], env=smoke_results.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_pipeline_reruns_only_what_was_missing(smoke, tmp_path, capsys):
    command = ["pipeline", "placement", "--scale", "smoke", *smoke.overrides(tmp_path)]
    first = _moc(*command)
    seen, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = first.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "[1/2] pre_silu: trained" in line:
            break
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert any("[1/2] pre_silu: trained" in line for line in seen), "".join(seen[-30:])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    before = {r["run_name"]: r for r in runs_table(uri, "placement-smoke")}
    assert before["placement-smoke"]["status"] == "RUNNING"  # the parent, killed
    assert before["pre_silu"]["status"] == "FINISHED"

    with smoke_results.one_thread():
        assert main(command) == 0
    out = capsys.readouterr().out
    assert "[1/2] pre_silu: finished before, skipped" in out
    assert "[2/2] post_silu: trained" in out or "[2/2] post_silu: resumed" in out
    after = {r["run_name"]: r for r in runs_table(uri, "placement-smoke")}
    assert set(after) == {"placement-smoke", "pre_silu", "post_silu"}
    assert after["placement-smoke"]["run_id"] == before["placement-smoke"]["run_id"]
    assert after["placement-smoke"]["status"] == "FINISHED"
    assert after["pre_silu"]["run_id"] == before["pre_silu"]["run_id"]
    assert after["pre_silu"]["end_time"] == before["pre_silu"]["end_time"]  # not trained again
    assert after["post_silu"]["status"] == "FINISHED"
    assert after["post_silu"]["parent_run_id"] == after["placement-smoke"]["run_id"]


class _OutOfMemoryAtBatch(Callback):
    """Raises CUDA's out-of-memory error at the first training batch of `batch_size` rows or more."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch["input_ids"].shape[0] >= self.batch_size:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def test_out_of_memory_ends_a_variants_climb(smoke, tmp_path, monkeypatch, capsys):
    import moc_lightning.sweep.children as children

    real = children.run_train

    def run_train(overrides, config_dir=None, print_config=True, *, callbacks=(), **kwargs):
        return real(overrides, config_dir, print_config, callbacks=[*callbacks, _OutOfMemoryAtBatch(4)], **kwargs)

    monkeypatch.setattr(children, "run_train", run_train)
    command = ["pipeline", "batch-scaling", "--scale", "smoke", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
               "trainer.checkpoint_every_n_steps=2", *smoke.overrides(tmp_path)]
    with smoke_results.one_thread():
        assert main(command) == 0
        out = capsys.readouterr().out
        assert "swiglu-bsz4: out of memory" in out and "swiglu-bsz8: not tried" in out
        assert main(command) == 0  # again: the out-of-memory child is not tried again
    again = capsys.readouterr().out
    assert "swiglu-bsz4: out of memory" in again and "moc-bsz2: finished before, skipped" in again
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = {r["run_name"]: r for r in runs_table(uri, "batch-scaling-smoke")}
    assert set(runs) == {"batch-scaling-smoke", "swiglu-bsz2", "swiglu-bsz4", "moc-bsz2", "moc-bsz4"}
    assert runs["swiglu-bsz4"]["status"] == "FAILED" and runs["swiglu-bsz4"]["tags.moc.outcome"] == "oom"
    parent = runs["batch-scaling-smoke"]
    rows = table(uri, parent["run_id"], "results", tmp_path)
    assert [(r["variant"], r["batch_size"], r["status"]) for r in rows] == [
        ("swiglu", "2", "FINISHED"), ("swiglu", "4", "OOM"), ("moc", "2", "FINISHED"), ("moc", "4", "OOM")]
    largest = table(uri, parent["run_id"], "largest_batch", tmp_path)
    assert {(r["variant"], r["largest_batch_that_fits"], r["ran_out_of_memory"]) for r in largest} == {
        ("swiglu", "2", "True"), ("moc", "2", "True")}


@pytest.mark.parametrize("argv, words", [
    (["pipeline", "no-such"], ["unknown pipeline 'no-such'", "compare"]),
    (["pipeline", "compare", "--scale", "huge"], ["no scale 'huge'", "smoke", "gpu-small"]),
    (["pipeline", "compare", "pipeline.no_such=1"], ["no_such"]),
    (["pipeline", "compare", "pipeline.only=[swiglu,gelu]"], ["gelu", "moc_2-8"]),
    (["pipeline", "k-sweep", "pipeline.k_values=[8,999]"], ["K = 999", "d_ffn = 172"]),
    (["pipeline", "compare", "ffn.k=100000"], ["FFNConfig.k = 100000"]),
])
def test_bad_input_is_one_paragraph_and_leaves_no_run(tmp_path, capsys, argv, words):
    code = main([*argv, f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"run_dir={tmp_path}/runs"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and err.startswith("moc pipeline: error:") and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened
