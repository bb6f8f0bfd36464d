"""Named model sizes: the paper's LLaMA sizes, with GaLore's LLaMA configs' shapes.

All but `llama-tiny` use the T5 tokenizer's 32000-token vocabulary and the paper's training
sequence length of 256. Fields left out take ModelConfig's defaults (n_kv_heads = n_heads,
dense SwiGLU FFN, untied embeddings).
"""

from __future__ import annotations

_C4 = {"vocab_size": 32000, "max_seq_len": 256}

PRESETS: dict[str, dict] = {
    # Small enough for unit tests on a CPU; grouped-query attention so tests exercise it.
    "llama-tiny": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                   "d_ffn": 172, "max_seq_len": 64},
    # The main job's default on a CPU: trains in minutes on 2 cores (vocab of the embedded corpus' tokenizer).
    "llama-small": {"vocab_size": 4096, "d_model": 256, "n_layers": 4, "n_heads": 4, "d_ffn": 688, "max_seq_len": 128},
    "llama-60m": {**_C4, "d_model": 512, "d_ffn": 1376, "n_heads": 8, "n_layers": 8},
    "llama-130m": {**_C4, "d_model": 768, "d_ffn": 2048, "n_heads": 12, "n_layers": 12},
    "llama-350m": {**_C4, "d_model": 1024, "d_ffn": 2736, "n_heads": 16, "n_layers": 24},
    # The paper's Table 19 prints 24 heads and 32 layers for 1B, but 2048 is not divisible by 24;
    # GaLore's llama_1b config, which the paper follows, has 32 heads and 24 layers.
    "llama-1b": {**_C4, "d_model": 2048, "d_ffn": 5461, "n_heads": 32, "n_layers": 24},
    "llama-7b": {**_C4, "d_model": 4096, "d_ffn": 11008, "n_heads": 32, "n_layers": 32},
}
