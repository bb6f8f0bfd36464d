"""Run a pipeline: resolve its settings at a scale, plan and validate every child, then train them
under one MLflow parent run and log the report on it.

The same command finds the same runs: the invocation's folder, `<run_dir>/pipelines/<pipeline>-
<scale>-<hash>`, is named by a hash of the resolved settings and of every child's composed config,
and holds the parent's run id and the children's folders. Re-running skips the children that
FINISHED and resumes a killed one from its checkpoint; the report is always rebuilt from what all
children logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from moc_lightning.cli.config import ConfigError, build_job, compose
from moc_lightning.sweep import ChildResult, ParentRun, conf_dir, fingerprint, load_settings, split_overrides
from moc_lightning.tracking import table_markdown
from pipelines.base import Context, Pipeline, Report
from pipelines.rows import brief

SUMMARY_COLUMNS = ["variant", "batch_size", "k", "status", "val_ppl", "peak_memory_gb", "activation_mb",
                   "tokens_per_s", "part", "analytic_mb", "measured_mb"]


@dataclass
class PipelineOutcome:
    pipeline: str
    scale: str
    experiment: str
    parent_run_id: str
    folder: Path
    results: list[ChildResult]
    report: Report


def registry() -> dict[str, Pipeline]:
    from pipelines.batch_scaling import BatchScaling
    from pipelines.compare import Compare
    from pipelines.k_sweep import KSweep
    from pipelines.placement import Placement
    from pipelines.profile import Profile

    return {p.name: p for p in (Compare(), Placement(), KSweep(), BatchScaling(), Profile())}


def run_pipeline(name: str, scale: str = "smoke", overrides: Sequence[str] = (), config_dir: Optional[str] = None,
                 say: Callable[[str], None] = print) -> PipelineOutcome:
    """Run pipeline `name` at `scale`. Overrides starting with `pipeline.` change the pipeline's own
    settings (conf/pipeline/<name>.yaml); the others are the main job's, applied to every child."""
    pipelines = registry()
    if name not in pipelines:
        raise ConfigError(f"unknown pipeline {name!r}: the pipelines are {', '.join(pipelines)}")
    pipeline = pipelines[name]
    folder = conf_dir(config_dir)
    own, user_train = split_overrides(overrides, "pipeline.")
    settings = load_settings(folder / "pipeline" / f"{name}.yaml", scale, own, f"pipeline {name}")
    ctx = Context(name, scale, settings, user_train, str(folder), say)

    # Every child is composed and validated before the parent run opens: bad input leaves nothing behind.
    children = pipeline.plan(ctx)
    if not children:
        raise ConfigError(f"pipeline {name}: nothing to run at scale {scale!r}")
    jobs = [build_job(compose(list(child.overrides), "train", str(folder))) for child in children]
    children = [replace(child, tags={**child.tags, "moc.ffn_label": job.ffn.label}) for child, job in zip(children, jobs)]
    first = jobs[0]
    experiment = first.tracking.experiment or f"{name}-{scale}"
    key = fingerprint(name, scale, settings, [(c.name, j.fingerprint) for c, j in zip(children, jobs)])
    invocation = Path(first.run_dir).resolve() / "pipelines" / f"{name}-{scale}-{key}"
    tags = {"moc.role": "parent", "moc.pipeline": name, "moc.scale": scale, "moc.invocation": key}
    say(f"moc pipeline {name} ({scale}): {len(children)} children, experiment {experiment!r}, folder {invocation}")

    with ParentRun(first.tracking, invocation, experiment, f"{name}-{scale}", tags, str(folder), say) as parent:
        parent.log_text(to_yaml(settings), "pipeline_settings.yaml")
        results = pipeline.execute(ctx, parent, children)
        report = pipeline.report(ctx, results)
        for table, rows in report.tables.items():
            parent.log_table(rows, table)
        for figure_name, figure in report.figures.items():
            parent.log_figure(figure, figure_name)
        for json_name, payload in report.json.items():
            parent.log_text(json.dumps(payload), json_name)
        main = report.tables[report.main_table]
        columns = [c for c in SUMMARY_COLUMNS if any(c in row for row in main)]
        say(f"\n{table_markdown(brief(main, columns))}")
        say(f"moc pipeline {name}: parent run {parent.run_id} in experiment {experiment!r} "
            f"({parent.tracking.tracking_uri}); artifacts: "
            + ", ".join([*(f"{t}.md/.csv" for t in report.tables), *report.figures, *report.json]))
        return PipelineOutcome(name, scale, experiment, parent.run_id, invocation, results, report)


def to_yaml(settings: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(settings))
