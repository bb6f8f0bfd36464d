"""A static key/value cache for decoding: every buffer is allocated once, at its final size.

Tokens are written at slots (columns) of a (batch, max_len) grid; rows are left-padded, so a row's
pad slots are marked empty in `filled` and never attended to. Because nothing is reallocated and
every index is a device tensor, a decode step can be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import torch

from moc_lightning.models.config import ModelConfig


class KVCache:
    """keys/values: one (batch, max_len, n_kv_heads, head_dim) tensor a layer; filled: (batch,
    max_len), True where a slot holds a real (non-pad) token.

    A tensor a layer, not one (n_layers, ...) tensor written through views: torch.compile turns an
    in-place write into a view of a step's input into a copy of the whole input, so a compiled
    step copied the whole cache and wrote it back at every token (about 300 us of a llama-1b
    step on an H200, stop 18's `bench.decode_profile`); a write into a whole input is done in place.

    A model prepared for decoding (`prepare_for_decode`) writes its one-token steps' k and v from
    inside the attention kernel (`kernels.decode_attention.decode_attention_step`), not through
    `write`; the layout is the same."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, device=None, dtype=torch.float32):
        if batch < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.filled = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.slot_ids = torch.arange(max_len, device=device)

    @property
    def batch(self) -> int:
        return self.filled.shape[0]

    @property
    def max_len(self) -> int:
        return self.filled.shape[1]

    def reset(self) -> None:
        self.filled.zero_()

    def mark(self, slots: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Record which of the new tokens are real, and return the attention mask of the step:
        (batch, 1, new tokens, max_len), True where query slot i may read key slot j (j <= i and j
        filled). A query also sees its own slot, so a pad query never has an empty row (NaN)."""
        self.filled.index_copy_(1, slots, real)
        earlier = self.slot_ids[None, :] <= slots[:, None]  # (new, max_len)
        itself = self.slot_ids[None, :] == slots[:, None]
        return ((earlier[None] & self.filled[:, None, :]) | itself[None])[:, None]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's k, v (batch, new tokens, kv heads, head_dim) at `slots`; return the whole
        layer's keys and values (batch, max_len, kv heads, head_dim)."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(1, slots, k.to(keys.dtype))
        values.index_copy_(1, slots, v.to(values.dtype))
        return keys, values
