"""moc-lightning: LLaMA-style language models with Mixture-of-Channels sparse FFNs."""

__version__ = "0.1.0"
