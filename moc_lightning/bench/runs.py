"""Figures of finished `moc train` runs, read back from MLflow, as benchmark JSON lines.

    python -m moc_lightning.bench.runs [--experiment NAME] [--tracking-uri URI]

One record per run and figure: the last train loss, val loss and perplexity, peak GPU memory,
and tokens/s as the median over the logged intervals after the first (which holds compilation
and warm-up).
"""

from __future__ import annotations

import argparse
import statistics

from mlflow.tracking import MlflowClient

from moc_lightning.bench.common import emit
from moc_lightning.tracking import resolve_tracking_uri

# metric -> (figure name, unit); the last logged value of each is reported
LAST_VALUES = {
    "train/loss": ("train_loss", "nats"),
    "val/loss": ("val_loss", "nats"),
    "val/ppl": ("val_ppl", "ppl"),
    "memory/run_peak_allocated_gb": ("peak_allocated", "GB"),
    "memory/run_peak_reserved_gb": ("peak_reserved", "GB"),
    "memory/peak_rss_gb": ("peak_rss", "GB"),
    "activation/measured_mb": ("activation_measured", "MB"),
    "activation/ffn_mb": ("activation_ffn", "MB"),
    "activation/analytic_mb": ("activation_analytic", "MB"),
}
THROUGHPUT = "train/device/items_per_sec"


def report(tracking_uri: str | None, experiment: str | None = None) -> list[dict]:
    """Records for every run of `experiment` (of every experiment when None)."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    experiments = client.search_experiments() if experiment is None else [client.get_experiment_by_name(experiment)]
    if experiments == [None]:
        raise SystemExit(f"no experiment named {experiment!r}")
    ids = {e.experiment_id: e.name for e in experiments}
    records = []
    for run in client.search_runs(list(ids), order_by=["attributes.start_time ASC"]):
        context = {"experiment": ids[run.info.experiment_id], "run": run.info.run_name, "status": run.info.status, "ffn": run.data.tags.get("ffn.kind", "")}
        steps = int(run.data.metrics.get("trainer/global_step", 0)) or None
        for metric, (name, unit) in LAST_VALUES.items():
            if metric in run.data.metrics:
                history = client.get_metric_history(run.info.run_id, metric)
                last = max(history, key=lambda m: m.step)
                records.append(emit("train_run", name, last.value, unit, step=last.step, **context))
        rates = sorted(client.get_metric_history(run.info.run_id, THROUGHPUT), key=lambda m: m.step)
        if len(rates) > 1:
            tokens_per_s = statistics.median(m.value for m in rates[1:])
            records.append(emit("train_run", "tokens_per_s", tokens_per_s, "tokens/s", intervals=len(rates) - 1,
                                steps=steps, **context))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=None, help="default: every experiment in the store")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///mlflow.db in this folder")
    args = parser.parse_args()
    report(args.tracking_uri, args.experiment)


if __name__ == "__main__":
    main()
