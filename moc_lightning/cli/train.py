"""`moc train`: the main job. Compose the config, check the data, then train with Lightning into
one MLflow run; a restarted job (same command) resumes from its last checkpoint into the same run.

Order matters for bad input: the config and the data are checked before the MLflow run is
opened, so a mistake never leaves a half-written run marked RUNNING.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary
from lightning.pytorch.utilities.model_summary import summarize

from moc_lightning.cli.config import ConfigError, JobConfig, build_job, compose, to_yaml
from moc_lightning.data import MoCDataModule
from moc_lightning.models.transformer import DecoderLayer
from moc_lightning.tracking import log_config, log_final_metrics, log_text_artifact, standard_tags, tracked_run
from moc_lightning.training.callbacks import (
    ActivationMemoryMonitor,
    ChannelStatsMonitor,
    PeakMemoryMonitor,
    TokensSeen,
    throughput_monitor,
)
from moc_lightning.training.module import MoCLanguageModel


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in text).strip("_")


def run_directory(job: JobConfig) -> Path:
    return Path(job.run_dir) / _slug(job.experiment) / _slug(job.run_name)


def resolved_config(job: JobConfig) -> dict:
    """Every setting the job runs with, defaults filled in (what is printed, saved and logged)."""
    return {
        "model": job.model.to_dict(),
        "data": job.data.to_dict(),
        "optim": {**dataclasses.asdict(job.optim), "lr": job.optim.learning_rate(job.model.name)},
        "trainer": dataclasses.asdict(job.trainer),
        "tracking": dataclasses.asdict(job.tracking),
        "run_dir": job.run_dir,
        "name": job.run_name,
    }


def _accelerator(job: JobConfig) -> str:
    if job.trainer.accelerator != "auto":
        return job.trainer.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


def _strategy(name: str):
    if name == "fsdp":  # one FSDP unit per decoder layer, Lightning's own strategy
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(auto_wrap_policy={DecoderLayer}, sharding_strategy="FULL_SHARD")
    return name


def _with_tokenizer_vocab(job: JobConfig, vocab_size: int) -> JobConfig:
    asked = job.raw["model"].get("vocab_size")
    if asked is None:  # the model's vocabulary is the tokenizer's
        return job.with_vocab_size(vocab_size)
    if asked < vocab_size:
        raise ConfigError(f"model.vocab_size = {asked} is smaller than the tokenizer's vocabulary ({vocab_size}): "
                          f"raise it, or leave it null to use the tokenizer's")
    return job


def build_trainer(job: JobConfig, run_dir: Path, logger, extra_callbacks: Sequence[pl.Callback] = ()) -> tuple[pl.Trainer, list]:
    t = job.trainer
    accelerator = _accelerator(job)
    precision = t.precision or ("bf16-mixed" if accelerator in ("gpu", "cuda") else "32-true")
    monitors = [
        PeakMemoryMonitor(log_every_n_steps=t.log_every_n_steps),
        ActivationMemoryMonitor(every_n_steps=t.monitor_every_n_steps),
        ChannelStatsMonitor(every_n_steps=t.monitor_every_n_steps),
        TokensSeen(),
        throughput_monitor(window_size=max(2, min(50, t.log_every_n_steps))),  # rates need a full window
    ]
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                        every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=1, save_last=True),
        LearningRateMonitor(logging_interval="step"),
        ModelSummary(max_depth=2),
        *monitors,
        *extra_callbacks,  # e.g. a search's pruning callback
    ]
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t.strategy),
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=job.optim.grad_clip or None,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar,
        # the data loaders shard by rank themselves, and resume mid-epoch from their own state
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
    )
    return trainer, monitors


def run_train(
    overrides: list[str],
    config_dir: Optional[str] = None,
    print_config: bool = True,
    *,
    callbacks: Sequence[pl.Callback] = (),
    parent_run_id: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
) -> dict:
    """Run the main job; returns the final metrics. Raises ConfigError / DataError on bad input.

    Pipelines and the search run their children through here: `callbacks` join the trainer's,
    `parent_run_id` nests the MLflow run under a parent, `tags` are added to the run's tags.
    """
    job = build_job(compose(overrides, "train", config_dir))
    pl.seed_everything(job.trainer.seed, workers=True, verbose=False)

    datamodule = MoCDataModule(job.data)
    if rank_zero_only.rank == 0:  # other ranks start later and read the cache this builds
        datamodule.prepare_data()
    job = _with_tokenizer_vocab(job, datamodule.vocab_size)
    run_dir = run_directory(job)
    config = resolved_config(job)
    config_yaml = to_yaml(config)
    if print_config and rank_zero_only.rank == 0:
        print(f"moc train: {job.run_name} (experiment {job.experiment!r}, run folder {run_dir})\n{config_yaml}")

    module = MoCLanguageModel(model=job.model.to_dict(), optim=dataclasses.asdict(job.optim), total_steps=job.trainer.max_steps)
    module.set_batch_shape(job.data.batch_size, job.data.seq_len)
    last = run_dir / "checkpoints" / "last.ckpt"
    tags = {**standard_tags(job.ffn, job.model.name), "data": job.data_label, **(tags or {})}

    with tracked_run(job.tracking, run_dir, job.experiment, job.run_name, tags, parent_run_id=parent_run_id) as logger:
        if rank_zero_only.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_yaml)
            log_config(logger, config, config_yaml)
            log_text_artifact(logger, f"{summarize(module, max_depth=2)}\n\n{module.model}\n", "model_summary.txt")
        trainer, monitors = build_trainer(job, run_dir, logger, extra_callbacks=callbacks)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        for monitor in monitors:
            final.update(getattr(monitor, "summary", {}) or {})
        log_final_metrics(logger, {f"final/{k}": v for k, v in final.items()}, step=trainer.global_step)
    return final
