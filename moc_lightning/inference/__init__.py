"""Decoding: text generation with a static KV cache (and the MoC decode kernel, when prepared)."""

from moc_lightning.inference.generation import (
    DecodeStep,
    GenerationOutput,
    SamplingConfig,
    generate,
    left_pad,
    sample_next,
)

__all__ = ["generate", "GenerationOutput", "SamplingConfig", "DecodeStep", "left_pad", "sample_next"]
