"""LLaMA-style models with a choice of FFN per layer, their configs and named sizes."""

from moc_lightning.models.config import ModelConfig
from moc_lightning.models.presets import PRESETS
from moc_lightning.models.transformer import CausalLMOutput, MoCTransformer

__all__ = ["ModelConfig", "MoCTransformer", "CausalLMOutput", "PRESETS"]
