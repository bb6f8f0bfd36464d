"""Activation memory: the paper's analytic accounting, and what autograd really saves."""

from moc_lightning.profiling.analytic import ffn_activation_bytes, model_activation_bytes
from moc_lightning.profiling.report import ffn_memory_rows, format_table
from moc_lightning.profiling.saved_tensors import (
    SavedBytes,
    SavedTensorRecorder,
    measure_model_saved_bytes,
    measure_saved_bytes,
    model_category,
    model_scopes,
)

__all__ = [
    "ffn_activation_bytes", "model_activation_bytes", "ffn_memory_rows", "format_table", "SavedBytes",
    "SavedTensorRecorder", "measure_saved_bytes", "measure_model_saved_bytes", "model_scopes", "model_category",
]
