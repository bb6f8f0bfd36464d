"""The LightningModule: a MoCTransformer trained on next-token loss with AdamW and warm-up + cosine."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from moc_lightning.models import ModelConfig, MoCTransformer
from moc_lightning.training.optim import OptimConfig, build_optimizer


class MoCLanguageModel(pl.LightningModule):
    """Batches are dicts {'input_ids': (batch, seq)}; labels are the inputs (the model shifts them).

    Logs train/loss and train/lr every step, val/loss and val/ppl per validation. Perplexity is
    exp of the token-weighted mean validation loss, accumulated by a torchmetrics MeanMetric so
    that it is reduced correctly across ranks.
    """

    def __init__(self, model: dict, optim: dict, total_steps: int):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the job logs the whole resolved config itself
        self.model_cfg = ModelConfig.from_dict(model)
        self.optim_cfg = OptimConfig(**optim)
        self.total_steps = total_steps
        self.model = MoCTransformer(self.model_cfg)
        self.val_loss = MeanMetric()
        # Read by Lightning's ThroughputMonitor for FLOP/s and MFU; set by `set_batch_shape`.
        self.flops_per_batch: Optional[int] = None

    def set_batch_shape(self, batch_size: int, seq_len: int) -> None:
        self.flops_per_batch = self.model.flops_per_token(seq_len) * batch_size * seq_len

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return self.model(input_ids, labels=labels)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = self.model(ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = self.model(ids, labels=ids).loss
        self.val_loss.update(loss, weight=ids[:, 1:].numel())

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), prog_bar=True)

    def configure_optimizers(self):
        lr = self.optim_cfg.learning_rate(self.model_cfg.name)
        optimizer, schedule = build_optimizer(self.model.parameters(), self.optim_cfg, lr, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
