"""A LLaMA-style decoder whose FFNs are dense SwiGLU, MoC or a baseline, one per layer.

Module and parameter names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.i.self_attn.
q_proj, ..., mlp.gate_proj, norm, lm_head), so state dicts map onto HF checkpoints by name.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moc_lightning.ffn import build_ffn
from moc_lightning.kernels import decode_attention
from moc_lightning.models.chunked_loss import chunked_lm_head_loss
from moc_lightning.models.config import ModelConfig
from moc_lightning.models.kv_cache import KVCache


class CausalLMOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # (batch, seq, vocab); None when the loss was computed in chunks
    loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy, float32, when labels given


# --- rotary position embedding -------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's convention: channel i is paired with channel i + d/2 (not with its neighbour)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by the angles of its positions; cos/sin are
    (seq, head_dim), shared by the batch, or (batch, seq, head_dim), one row of positions each.

    Done in float32 and cast back: in bf16 the angles of late positions lose too many bits.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class RotaryTables(nn.Module):
    """cos/sin tables (positions x head_dim, float32) for the training length, grown when needed.

    Buffers are non-persistent: they are a function of the config, not learned, and stay out of
    checkpoints.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._build(max_seq_len, device=None)

    def _build(self, length: int, device) -> None:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # both halves of a rotate_half pair share an angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, positions={self.cos.shape[0]}, theta={self.theta:g}"

    def reset(self) -> None:
        self._build(self.cos.shape[0], self.cos.device)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Rebuild when the input is longer than the tables, or when model.to(dtype) cast them.
        if seq_len > self.cos.shape[0] or self.cos.dtype != torch.float32 or self.cos.device != device:
            self._build(max(seq_len, self.cos.shape[0]), device)
        return self.cos[:seq_len], self.sin[:seq_len]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at given positions (batch, seq) -> (batch, seq, head_dim). The tables must
        already cover them (call the module with the longest length first): no rebuild happens
        here, so a CUDA graph can capture it."""
        return self.cos[positions], self.sin[positions]


# --- the decoder -----------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (n_kv_heads <= n_heads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.flash_attn_func = None
        if cfg.attention == "flash_attn":
            try:  # fail when the model is built, not at the first step of a training run
                from flash_attn import flash_attn_func
            except ImportError as exc:
                raise RuntimeError("attention='flash_attn' but flash_attn is not installed: "
                                   "install flash-attn or use attention='sdpa'") from exc
            self.flash_attn_func = flash_attn_func
        # Decoding steps of one token a row go to the split-cache kernel, RoPE and the cache write
        # included (`prepare_for_decode`).
        self.decode_kernel = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional["CacheStep"] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cache is not None and self.decode_kernel and s == 1 and decode_attention.applies(x, cache.kv.keys[cache.layer]):
            # One kernel for RoPE, the cache write and the attention (cos/sin: (batch, 1, head_dim)).
            out = decode_attention.decode_attention_step_op(
                q.view(b, self.n_heads, self.head_dim), k.view(b, self.n_kv_heads, self.head_dim),
                v.view(b, self.n_kv_heads, self.head_dim), cos[:, 0], sin[:, 0], cache.kv.keys[cache.layer],
                cache.kv.values[cache.layer], cache.kv.filled, cache.slots)
            return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))
        q = apply_rotary(q.view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        if cache is not None:
            # Decoding: attend over the whole static cache, masked to this row's earlier real tokens.
            keys, values = cache.kv.write(cache.layer, cache.slots, k, v)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=cache.mask, enable_gqa=self.n_kv_heads != self.n_heads)
            out = out.transpose(1, 2)
        elif self.flash_attn_func is not None:
            # flash_attn takes (batch, seq, heads, dim) and handles fewer k/v heads itself.
            out = self.flash_attn_func(q, k, v, causal=True)
        else:
            # SDPA wants (batch, heads, seq, dim); enable_gqa shares each k/v head among
            # n_heads / n_kv_heads consecutive query heads, as HF's repeat_kv does.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = build_ffn(cfg.ffn_config(layer))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional["CacheStep"] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CacheStep(NamedTuple):
    """What one layer needs to read and extend the KV cache during a decoding step."""

    kv: KVCache
    layer: int
    slots: torch.Tensor  # (new tokens,) cache columns being written
    mask: torch.Tensor  # (batch, 1, new tokens, max_len) bool attention mask


class LMHead(nn.Linear):
    """The output projection d_model -> vocab. Called with labels it returns the loss instead,
    computed `chunk_tokens` rows at a time without the logits (see chunked_loss). Going through
    the module call, rather than taking its weight, keeps what the loss saves under lm_head's
    name for the activation-memory hooks (moc_lightning.profiling)."""

    def __init__(self, d_model: int, vocab_size: int, chunk_tokens: int = 0):
        super().__init__(d_model, vocab_size, bias=False)
        self.chunk_tokens = chunk_tokens

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return chunked_lm_head_loss(h, self.weight, labels, self.chunk_tokens)


class MoCTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss_chunk_tokens)
        self.rotary = RotaryTables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()
        if cfg.tie_embeddings:  # one matrix both reads tokens in and scores them out
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        # HF LLaMA's init: every matrix ~ N(0, init_std), norms start as the identity.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise all weights and rebuild the RoPE tables (e.g. after meta-device init + to_empty)."""
        self.apply(self._init_weights)
        self.rotary.reset()

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids (batch, seq) -> logits (batch, seq, vocab); with labels (batch, seq), also the
        loss of predicting token t+1 from tokens <= t (labels equal to -100 are ignored).
        With labels and cfg.loss_chunk_tokens > 0, the loss only: logits is None."""
        cos, sin = self.rotary(input_ids.shape[1], input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        if labels is not None and self.cfg.loss_chunk_tokens:
            # Shift the labels rather than the states: each row's last position gets -100, so the
            # flattened states stay a view of the norm's output instead of a (tokens, d) copy.
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            return CausalLMOutput(None, self.lm_head(self.norm(x).flatten(0, 1), shifted.flatten()))
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            # Shift here, as HF does, so labels can simply be input_ids; float32 for a stable softmax.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits, loss)

    # --- decoding ------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty static KV cache on the model's device and in its dtype; grows the RoPE tables
        to max_len now, so that later steps never rebuild them."""
        weight = self.embed_tokens.weight
        self.rotary(max_len, weight.device)
        return KVCache(self.cfg, batch, max_len, device=weight.device, dtype=weight.dtype)

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor, slots: torch.Tensor,
                       real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (batch, new, vocab) of new tokens input_ids (batch, new) written at cache columns
        `slots` (new,), with RoPE positions `positions` (batch, new); `real` (batch, new) marks
        the tokens that are not padding (default: all). Earlier slots are read from the cache."""
        if real is None:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        mask = cache.mark(slots, real)
        cos, sin = self.rotary.at(positions)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, CacheStep(cache, i, slots, mask))
        return self.lm_head(self.norm(x))

    def prepare_for_decode(self, enable: bool = True) -> int:
        """Switch every MoC FFN to its decode kernel for small no-grad batches (see
        moc_lightning.ffn.decode), and every attention's one-token steps over the KV cache to the
        split-cache kernel (moc_lightning.kernels.decode_attention), where triton runs; False
        switches both back. Returns how many FFNs were switched."""
        switched = 0
        for layer in self.layers:
            layer.self_attn.decode_kernel = enable
            if hasattr(layer.mlp, "prepare_for_decode"):
                layer.mlp.prepare_for_decode(enable)
                switched += 1
        return switched

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied lm_head counts once); without the token embedding if asked."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed_tokens.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token, the standard estimate (Kaplan et al. 2020; PaLM appendix B):

        6 * N for the forward and backward matmuls over the weights, with N the non-embedding
        parameters plus lm_head's (a lookup costs nothing, the output projection does), plus
        12 * n_layers * d_model * seq_len for the attention scores and their weighted sum.
        It counts MoC's FFN as dense.
        """
        seq_len = self.cfg.max_seq_len if seq_len is None else seq_len
        # Parameters that take part in matmuls: the layers, the final norm and lm_head (a tied
        # lm_head shares its matrix with the embedding but still computes).
        n = sum(p.numel() for p in self.layers.parameters()) + self.norm.weight.numel() + self.lm_head.weight.numel()
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len
