"""Analytic activation memory (Section 2 and Table 1 of the paper), in bytes.

Each FFN kind lists the tensors its backward needs, named as in the paper. One deliberate
difference: the paper counts the FFN output D as an FFN activation, while the FFN itself keeps its
input X (the output D is kept by whoever consumes it); both are d wide per token, so the totals
agree. Indices are counted at the width the implementation stores them (int16 below 32768
channels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moc_lightning.ffn.compact import index_dtype, keep_count
from moc_lightning.ffn.config import FFNConfig

if TYPE_CHECKING:  # profiling sits above models in the layering, but only needs their config
    from moc_lightning.models.config import ModelConfig


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def ffn_activation_bytes(cfg: FFNConfig, tokens: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes each tensor an FFN saves for backward takes, for `tokens` rows of input."""
    v = _itemsize(dtype)
    d, f = cfg.d_model, cfg.d_ffn
    if cfg.checkpoint:  # the whole FFN is recomputed in backward from its input
        return {"X": tokens * d * v}
    if cfg.kind == "swiglu":
        parts = {"X": d * v, "G": f * v, "U": f * v, "S": f * v, "Z": f * v}
    elif cfg.kind == "relu":  # ReLU keeps its output, shared by its own backward and the product's
        parts = {"X": d * v, "ReLU(G)": f * v, "U": f * v, "Z": f * v}
    elif cfg.kind == "drelu":
        parts = {"X": d * v, "ReLU(G)": f * v, "ReLU(U)": f * v, "Z": f * v}
    elif cfg.kind == "moc":
        kept, i = cfg.kept_channels, _itemsize(index_dtype(f))
        parts = {"X": d * v, "G*M": kept * v, "U*M": kept * v, "M (indices)": kept * i}
        if not cfg.recompute:
            parts.update({"S*M": kept * v, "Z*M": kept * v})
    elif cfg.kind == "backrazor":
        parts = {}
        for name, width in (("X", d), ("G", f), ("U", f), ("Z", f)):
            parts[f"{name} (top {cfg.backrazor_keep:g})"] = keep_count(cfg.backrazor_keep, width) * (
                v + _itemsize(index_dtype(width))
            )
    else:  # FFNConfig refuses unknown kinds; this guards a kind added without its accounting
        raise ValueError(f"no activation accounting for FFN kind {cfg.kind!r}")
    return {name: tokens * b for name, b in parts.items()}


def model_activation_bytes(
    cfg: "ModelConfig", batch: int, seq_len: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """Section 2's breakdown for a whole model: attention 5bsd (with GQA, K and V are narrower),
    FFN per layer and kind, RMSNorm 2bsd and residual 2bsd per layer, and the LM head (its input
    and the float32 logits the loss keeps or, with cfg.loss_chunk_tokens, the float32 log-sum-exp
    and the int64 shifted label of each token instead)."""
    tokens, v, d = batch * seq_len, _itemsize(dtype), cfg.d_model
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer_attention = tokens * (3 * d + 2 * kv) * v  # Q, A, O and K, V
    ffn = sum(sum(ffn_activation_bytes(cfg.ffn_config(i), tokens, dtype).values()) for i in range(cfg.n_layers))
    return {
        "attention": cfg.n_layers * per_layer_attention,
        "ffn": ffn,
        "rmsnorm": cfg.n_layers * 2 * tokens * d * v,
        "residual": cfg.n_layers * 2 * tokens * d * v,
        "lm_head": tokens * d * v + tokens * (4 + 8 if cfg.loss_chunk_tokens else cfg.vocab_size * 4),
    }
