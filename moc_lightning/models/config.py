"""The model's shape and its FFN settings in one validated config.

A config is checked completely when it is built (every layer's FFN included), so a bad setting
fails at once with a message naming the field, instead of deep inside a training run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from moc_lightning.ffn import FFNConfig

ATTENTIONS = ("sdpa", "flash_attn")
# FFN settings a config may name in `ffn` / `ffn_overrides`. d_model and d_ffn come from the model.
FFN_KEYS = tuple(f.name for f in dataclasses.fields(FFNConfig) if f.name not in ("d_model", "d_ffn"))


def _refuse(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"ModelConfig.{name} = {value!r} is not allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ffn_keys(name: str, settings) -> dict:
    if not isinstance(settings, dict):
        raise _refuse(name, settings, f"expected a dict of FFN settings with keys among {', '.join(FFN_KEYS)}")
    unknown = sorted(str(key) for key in settings if key not in FFN_KEYS)
    if unknown:
        hint = " (set ModelConfig.d_model / d_ffn instead)" if {"d_model", "d_ffn"} & set(unknown) else ""
        raise _refuse(name, settings, f"unknown key(s) {', '.join(unknown)}{hint}; allowed keys: {', '.join(FFN_KEYS)}")
    return dict(settings)


def _layer_index(key, n_layers: int) -> int:
    # JSON and YAML turn integer keys into strings; take those back.
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    if not _is_int(key) or not 0 <= key < n_layers:
        raise ValueError(f"ModelConfig.ffn_overrides has layer index {key!r}, which is not allowed: "
                         f"expected integers in [0, {n_layers}) (n_layers = {n_layers})")
    return key


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder: sizes, attention, and which FFN every layer uses.

    n_kv_heads  None means n_heads (multi-head attention); fewer gives grouped-query attention.
    max_seq_len the training sequence length; RoPE tables are built for it and grown on demand.
    ffn         FFNConfig fields (not d_model / d_ffn) shared by all layers, e.g. {'kind': 'moc'}.
    ffn_overrides  {layer index: FFN fields} replacing `ffn`'s values at that layer only.
    loss_chunk_tokens  0: the loss from the whole logits; N > 0: N tokens at a time, never holding
                the (tokens, vocab) logits (forward then returns logits=None when given labels).
    """

    name: str = "custom"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    d_ffn: int = 1376
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention: str = "sdpa"
    tie_embeddings: bool = False
    loss_chunk_tokens: int = 0
    ffn: dict = field(default_factory=lambda: {"kind": "swiglu"})
    ffn_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if not isinstance(self.name, str) or not self.name:
            raise _refuse("name", self.name, "expected a non-empty string")
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ffn", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise _refuse(name, value, "expected an integer >= 1")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise _refuse(name, value, "expected a number > 0")
        if self.attention not in ATTENTIONS:
            raise _refuse("attention", self.attention, f"expected one of {', '.join(ATTENTIONS)}")
        if not isinstance(self.tie_embeddings, bool):
            raise _refuse("tie_embeddings", self.tie_embeddings, "expected true or false")
        if not _is_int(self.loss_chunk_tokens) or self.loss_chunk_tokens < 0:
            raise _refuse("loss_chunk_tokens", self.loss_chunk_tokens,
                          "expected an integer >= 0 (0: the whole logits at once; N: the loss N tokens at a time)")
        if self.d_model % self.n_heads:
            raise _refuse("n_heads", self.n_heads, f"must divide d_model = {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise _refuse("n_kv_heads", self.n_kv_heads, f"must divide n_heads = {self.n_heads} (1 <= n_kv_heads <= n_heads)")
        if self.head_dim % 2:
            raise _refuse("d_model", self.d_model,
                          f"head_dim = d_model / n_heads = {self.head_dim} must be even (RoPE rotates channel pairs)")
        # Copies, so that changing the caller's dicts later cannot bypass this validation.
        set_("ffn", _check_ffn_keys("ffn", self.ffn))
        if not isinstance(self.ffn_overrides, dict):
            raise _refuse("ffn_overrides", self.ffn_overrides, "expected a dict {layer index: dict of FFN settings}")
        overrides = {}
        for key, settings in self.ffn_overrides.items():
            layer = _layer_index(key, self.n_layers)
            overrides[layer] = _check_ffn_keys(f"ffn_overrides[{layer}]", settings)
        set_("ffn_overrides", dict(sorted(overrides.items())))
        for layer in range(self.n_layers):  # FFNConfig raises its own ValueError on bad values
            self.ffn_config(layer)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def ffn_config(self, layer: int) -> FFNConfig:
        """The FFN of layer `layer`: `ffn`, with that layer's overrides on top."""
        if not _is_int(layer) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer = {layer!r} is out of range: expected 0 <= layer < n_layers = {self.n_layers}")
        settings = {**self.ffn, **self.ffn_overrides.get(layer, {})}
        return FFNConfig(d_model=self.d_model, d_ffn=self.d_ffn, **settings)

    # --- conversions -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of `to_dict`, also after a JSON round trip (string layer keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with `changes` (fields replaced whole, `ffn` included)."""
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see presets.PRESETS) with `overrides`; `ffn=` is merged into the preset's."""
        from moc_lightning.models.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: known presets are {', '.join(PRESETS)}")
        return cls._with_overrides({"name": name, **PRESETS[name]}, overrides)

    @classmethod
    def from_hf_json(cls, path, **overrides) -> "ModelConfig":
        """A config from a Hugging Face LlamaConfig-style config.json (or a folder holding one).

        max_position_embeddings is the longest context the model supports, not the training
        sequence length, so max_seq_len keeps its default unless overridden.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config.json at {path}")
        hf = json.loads(path.read_text())
        required = {"hidden_size": "d_model", "intermediate_size": "d_ffn", "num_attention_heads": "n_heads",
                    "num_hidden_layers": "n_layers", "vocab_size": "vocab_size"}
        optional = {"num_key_value_heads": "n_kv_heads", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
                    "initializer_range": "init_std", "tie_word_embeddings": "tie_embeddings"}
        fields = {"name": path.resolve().parent.name or "custom"}
        for key, ours in required.items():
            if key not in hf:
                raise ValueError(f"{path} has no {key!r}, which a LLaMA config needs (it gives ModelConfig.{ours})")
            fields[ours] = hf[key]
        fields.update({ours: hf[key] for key, ours in optional.items() if hf.get(key) is not None})
        return cls._with_overrides(fields, overrides)

    @classmethod
    def _with_overrides(cls, fields: dict, overrides: dict) -> "ModelConfig":
        fields = dict(fields)
        if "ffn" in overrides:  # merge, so ffn={'kind': 'moc'} keeps the base's other FFN settings
            overrides = dict(overrides)
            extra = overrides.pop("ffn")
            base = fields.get("ffn", {"kind": "swiglu"})
            fields["ffn"] = {**base, **extra} if isinstance(extra, dict) else extra  # non-dicts fail validation
        return cls.from_dict({**fields, **overrides})

