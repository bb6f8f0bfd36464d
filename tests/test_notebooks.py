"""The analysis notebooks execute on the smoke results (every pipeline and the smoke study, read
from MLflow) and draw their figures; a notebook that fails fails the test with its error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import smoke_results

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["comparison", "k_curves", "memory_and_activations", "pareto_front"]
FIGURES = {
    "comparison": ["compare.png", "compare_ppl_vs_activation.png"],
    "k_curves": ["k_curves.png", "k_training_curves.png"],
    "memory_and_activations": ["memory_breakdown.png", "gate_histograms_swiglu.png", "gate_histograms_moc.png"],
    "pareto_front": ["pareto_front.png"],
}


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> smoke_results.SmokeStore:
    smoke_results.pipelines(tmp_path_factory)
    return smoke_results.search(tmp_path_factory)


def test_notebooks_are_reviewable_percent_scripts():
    import jupytext

    for name in NOTEBOOKS:
        notebook = jupytext.read(REPO / "notebooks" / f"{name}.py")
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "tracking_uri = None" in tagged[0].source, name
        assert notebook.cells[0].cell_type == "markdown"


def test_notebooks_execute_on_the_smoke_results(smoke, tmp_path):
    out = tmp_path / "rendered"
    done = subprocess.run([sys.executable, str(REPO / "notebooks" / "render.py"), "--tracking-uri", smoke.tracking_uri,
                           "--out", str(out)], env=smoke_results.subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in NOTEBOOKS:
        notebook = nbformat.read(out / f"{name}.ipynb", as_version=4)
        outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outputs), name
        injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and smoke.tracking_uri in injected[0].source
        for figure in FIGURES[name]:
            assert (out / name / figure).read_bytes()[:4] == b"\x89PNG", (name, figure)


def _render_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", REPO / "notebooks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_cell_fails_the_render_with_the_notebooks_name(tmp_path):
    render = _render_module()
    script = tmp_path / "broken.py"
    script.write_text('# %% tags=["parameters"]\nanswer = 1\n\n# %%\nassert answer == 42, f"answer is {answer}"\n')
    with pytest.raises(RuntimeError, match=r"(?s)notebook broken.py failed.*answer is 41"):
        render.render(script, tmp_path / "out", {"answer": 41})
    assert (tmp_path / "out" / "broken.ipynb").exists()  # what ran is kept, for reading the failure


def test_a_store_copied_from_another_machine_reads_its_own_artifacts(smoke, tmp_path):
    """GPU results come back as mlflow.db and mlruns/ with the GPU machine's absolute paths inside."""
    import shutil

    from moc_lightning.sweep import latest_parent, load_artifact_text, relocate_artifacts

    shutil.copy(smoke.root / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(smoke.root / "mlruns", tmp_path / "mlruns")
    copy = f"sqlite:///{tmp_path}/mlflow.db"
    parent = latest_parent(copy, "compare-smoke", moc__pipeline="compare")
    (tmp_path / "mlruns" / parent["run_id"] / "artifacts" / "results.md").write_text("the copy\n")
    assert load_artifact_text(copy, parent["run_id"], "results.md") != "the copy\n"  # still the original's files
    assert relocate_artifacts(copy, str(tmp_path / "mlruns")) > 0
    assert load_artifact_text(copy, parent["run_id"], "results.md") == "the copy\n"
    assert relocate_artifacts(copy, str(tmp_path / "mlruns")) == 0  # nothing left to move
