"""Pruning from the validation perplexity, reported at each validation of a step-based run.

Why not `optuna_integration.PyTorchLightningPruningCallback`: it reports at `current_epoch`, and
the main job trains by steps within one long epoch, so every report after the first lands on step
0 and Optuna ignores it (the pruner would judge a trial on its first validation only); and it
raises TrialPruned inside `fit`, which Lightning treats as a crash (the trial's MLflow run would end
FAILED, its checkpoint callbacks cut short). This callback reports at `trainer.global_step` and,
when the pruner says so, asks the trainer to stop; the objective then raises TrialPruned itself.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer


class StepPruningCallback(Callback):
    """Report `monitor` to an Optuna trial at each validation, at the global step; stop when pruned."""

    def __init__(self, trial: Any, monitor: str = "val/ppl"):
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: Optional[int] = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_at is not None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        self.trial.report(float(value), step=int(trainer.global_step))
        # At the last validation the trial has finished training: it completes, whatever the pruner thinks.
        if trainer.global_step < trainer.max_steps and self.trial.should_prune():
            self.pruned_at = int(trainer.global_step)
            trainer.should_stop = True
