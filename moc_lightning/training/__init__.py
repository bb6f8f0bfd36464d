"""Lightning training: the LightningModule, its optimiser schedule and the monitoring callbacks."""
