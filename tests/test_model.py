"""The LLaMA-style model: config validation, presets, and the forward pass against references
written here from the formulas (float64), not from the model's own code."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moc_lightning.ffn import FFN_CLASSES, KINDS
from moc_lightning.models import PRESETS, CausalLMOutput, ModelConfig, MoCTransformer
from moc_lightning.models.transformer import RotaryTables, apply_rotary


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("llama-tiny", **overrides)


def random_ids(cfg: ModelConfig, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq))


# --- references ---------------------------------------------------------------------------------


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (b, s, h, d) rotated in float64: channel i and i + d/2 form a pair turned by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * freqs[None, :]  # (s, half)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x = x.double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def ref_attention(attn, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Causal GQA with k/v heads repeated explicitly and a masked softmax, all in float64."""
    b, s, _ = x.shape
    h, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = x.double()
    q = (x @ attn.q_proj.weight.double().T).view(b, s, h, d)
    k = (x @ attn.k_proj.weight.double().T).view(b, s, kv, d)
    v = (x @ attn.v_proj.weight.double().T).view(b, s, kv, d)
    pos = torch.arange(s)
    q, k = ref_rope(q, pos, cfg.rope_theta), ref_rope(k, pos, cfg.rope_theta)
    # query head j reads k/v head j // (h / kv)
    k, v = k.repeat_interleave(h // kv, dim=2), v.repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    future = torch.ones(s, s, dtype=torch.bool).triu(diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, h * d)
    return out @ attn.o_proj.weight.double().T


def ref_rmsnorm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def ref_model_logits(model: MoCTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The whole dense SwiGLU model in float64, from its weights."""
    cfg = model.cfg
    x = model.embed_tokens.weight.double()[ids]
    for layer in model.layers:
        x = x + ref_attention(layer.self_attn, ref_rmsnorm(x, layer.input_layernorm.weight, cfg.norm_eps), cfg)
        h = ref_rmsnorm(x, layer.post_attention_layernorm.weight, cfg.norm_eps)
        mlp = layer.mlp
        gate, up = h @ mlp.gate_proj.weight.double().T, h @ mlp.up_proj.weight.double().T
        x = x + (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.double().T
    return ref_rmsnorm(x, model.norm.weight, cfg.norm_eps) @ model.lm_head.weight.double().T


def expected_params(V, d, L, H, KV, F_, tied=False) -> int:
    """Parameter count from the shapes: q/o are d x (H*hd), k/v are d x (KV*hd), three FFN
    matrices d x F, two norms per layer, one final norm, embedding and (untied) lm_head V x d."""
    hd = d // H
    per_layer = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * F_ + 2 * d
    return V * d * (1 if tied else 2) + L * per_layer + d


# --- forward pass -------------------------------------------------------------------------------


def test_logits_shape_and_output_type():
    cfg = tiny()
    model = MoCTransformer(cfg)
    out = model(random_ids(cfg, 3, 17))
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (3, 17, cfg.vocab_size)
    assert out.loss is None


def test_forward_matches_float64_reference_model():
    cfg = tiny(n_layers=2)
    model = MoCTransformer(cfg)
    # Non-trivial norm weights, so a norm that ignores its weight would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = random_ids(cfg, 2, 20)
    torch.testing.assert_close(model(ids).logits.double(), ref_model_logits(model, ids), atol=2e-5, rtol=1e-4)


def test_loss_is_shifted_cross_entropy_in_float64():
    cfg = tiny()
    model = MoCTransformer(cfg)
    ids = random_ids(cfg, 2, 12)
    labels = ids.clone()
    labels[0, 3] = labels[1, 7] = labels[1, 11] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.detach().double()[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = nll[keep].mean()
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_initial_loss_is_near_uniform():
    # With N(0, 0.02) weights the logits are nearly flat, so the loss starts near ln(vocab).
    cfg = tiny()
    ids = random_ids(cfg, 4, 32)
    loss = MoCTransformer(cfg)(ids, labels=ids).loss.item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("kind", ["swiglu", "moc"])
def test_causality(kind):
    cfg = tiny(ffn={"kind": kind, "k": 16})
    model = MoCTransformer(cfg).eval()
    ids = random_ids(cfg, 2, 24)
    t = 10
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_attention_matches_reference(n_kv_heads):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, d_ffn=48, max_seq_len=16)
    model = MoCTransformer(cfg)
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (n_kv_heads * cfg.head_dim, cfg.d_model)
    x = torch.randn(2, 13, cfg.d_model)
    cos, sin = model.rotary(13, x.device)
    with torch.no_grad():
        got = attn(x, cos, sin)
    torch.testing.assert_close(got.double(), ref_attention(attn, x, cfg), atol=1e-5, rtol=1e-4)


# --- RoPE ---------------------------------------------------------------------------------------


def test_rope_tables_match_reference_rotation():
    rotary = RotaryTables(head_dim=16, max_seq_len=40, theta=10000.0)
    x = torch.randn(1, 40, 3, 16)
    got = apply_rotary(x, rotary.cos, rotary.sin)
    torch.testing.assert_close(got.double(), ref_rope(x, torch.arange(40), 10000.0), atol=1e-5, rtol=1e-5)
    assert rotary.cos.dtype == torch.float32
    assert "cos" not in rotary.state_dict()  # non-persistent: rebuilt from the config


@pytest.mark.parametrize("p,c", [(0, 5), (7, 3), (50, 20), (100, 37)])
def test_rope_depends_only_on_relative_position(p, c):
    rotary = RotaryTables(head_dim=16, max_seq_len=8, theta=10000.0)
    cos, sin = rotary(p + c + 1, torch.device("cpu"))  # grows past 8 on demand
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def dot(pos_q, pos_k):
        rq = apply_rotary(q, cos[pos_q : pos_q + 1], sin[pos_q : pos_q + 1])
        rk = apply_rotary(k, cos[pos_k : pos_k + 1], sin[pos_k : pos_k + 1])
        return (rq * rk).sum(-1)

    torch.testing.assert_close(dot(p, p + c), dot(0, c), atol=1e-4, rtol=1e-4)
    # and it is a rotation: norms are kept
    torch.testing.assert_close(apply_rotary(q, cos[p : p + 1], sin[p : p + 1]).norm(dim=-1), q.norm(dim=-1))


def test_rope_tables_grow_for_longer_inputs():
    cfg = tiny()  # max_seq_len 64
    model = MoCTransformer(cfg).eval()
    cos_before = model.rotary.cos.clone()
    assert cos_before.shape == (64, cfg.head_dim)
    ids = random_ids(cfg, 1, 100)
    with torch.no_grad():
        long_logits = model(ids).logits
        short_logits = model(ids[:, :64]).logits
    assert model.rotary.cos.shape == (100, cfg.head_dim)
    torch.testing.assert_close(model.rotary.cos[:64], cos_before)
    torch.testing.assert_close(long_logits[:, :64], short_logits, atol=1e-5, rtol=0)


def test_rope_stays_float32_in_a_bf16_model():
    cfg = tiny()
    model = MoCTransformer(cfg).to(torch.bfloat16)
    ids = random_ids(cfg, 1, 16)
    out = model(ids, labels=ids)
    assert model.rotary.cos.dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)


# --- init and parameter counts ------------------------------------------------------------------


def test_init_std_and_norm_weights():
    for std in (0.02, 0.05):
        model = MoCTransformer(tiny(init_std=std))
        linears = [m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)]
        weights = torch.cat(linears)
        assert len(linears) == 2 * 7 + 1
        assert weights.std().item() == pytest.approx(std, rel=0.02)
        assert abs(weights.mean().item()) < std / 50
        assert model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.03)
        assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.03)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
        assert len(norms) == 2 * 2 + 1
        for norm in norms:
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert norm.eps == 1e-6


@pytest.mark.parametrize("preset,literal", [("llama-60m", 58_073_600), ("llama-350m", 367_969_280)])
def test_preset_parameter_counts(preset, literal):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = MoCTransformer(cfg)
    n = expected_params(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ffn)
    assert n == literal  # the formula, checked once against a number worked out by hand
    assert model.num_parameters() == n
    assert model.num_parameters(exclude_embeddings=True) == n - cfg.vocab_size * cfg.d_model


def test_parameter_count_with_gqa_and_tied_embeddings():
    for tied in (False, True):
        cfg = tiny(tie_embeddings=tied)
        model = MoCTransformer(cfg)
        assert (model.lm_head.weight is model.embed_tokens.weight) == tied
        assert model.num_parameters() == expected_params(512, 64, 2, 4, 2, 172, tied=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token(tied):
    cfg = tiny(tie_embeddings=tied)
    model = MoCTransformer(cfg)
    V, d, L, s = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.max_seq_len
    # every parameter but the embedding lookup, lm_head counted once even when tied
    matmul = expected_params(V, d, L, 4, 2, 172, tied=True)
    assert model.flops_per_token() == 6 * matmul + 12 * L * d * s
    assert model.flops_per_token(seq_len=1000) == 6 * matmul + 12 * L * d * 1000


def test_meta_init_then_reset_parameters():
    cfg = tiny()
    with torch.device("meta"):
        model = MoCTransformer(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()
    fresh = MoCTransformer(cfg)
    torch.testing.assert_close(model.rotary.cos, fresh.rotary.cos)
    torch.testing.assert_close(model.rotary.sin, fresh.rotary.sin)
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))
    assert model.lm_head.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    ids = random_ids(cfg, 1, 8)
    assert torch.isfinite(model(ids, labels=ids).loss)


# --- presets and FFN settings -------------------------------------------------------------------


def test_presets():
    assert list(PRESETS) == ["llama-tiny", "llama-small", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"]
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert cfg.name == name and cfg.head_dim % 2 == 0
        if name not in ("llama-tiny", "llama-small"):
            assert (cfg.vocab_size, cfg.max_seq_len) == (32000, 256)
    one_b = ModelConfig.from_preset("llama-1b")
    assert (one_b.d_model, one_b.d_ffn, one_b.n_heads, one_b.n_layers) == (2048, 5461, 32, 24)
    assert tiny().n_kv_heads == 2 and ModelConfig.from_preset("llama-60m").n_kv_heads == 8
    with pytest.raises(ValueError, match=r"unknown preset 'llama-3b'.*llama-tiny.*llama-7b"):
        ModelConfig.from_preset("llama-3b")


def test_ffn_settings_flow_into_every_layer():
    cfg = tiny(ffn={"kind": "moc", "k": 8})
    model = MoCTransformer(cfg)
    for layer in model.layers:
        assert type(layer.mlp) is FFN_CLASSES["moc"]
        assert layer.mlp.cfg.k == 8 and layer.mlp.cfg.d_model == 64 and layer.mlp.cfg.d_ffn == 172


def test_ffn_override_merges_into_preset_ffn():
    assert tiny(ffn={"k": 8}).ffn == {"kind": "swiglu", "k": 8}
    cfg = tiny(ffn={"kind": "moc", "k": 8}, ffn_overrides={0: {"placement": "post_silu"}})
    assert cfg.ffn_config(0).kind == "moc" and cfg.ffn_config(0).k == 8
    assert cfg.ffn_config(0).placement == "post_silu" and cfg.ffn_config(1).placement == "pre_silu"


def test_per_layer_override_changes_only_that_layer():
    cfg = tiny(n_layers=3, ffn_overrides={1: {"kind": "moc", "group": "2:8"}})
    model = MoCTransformer(cfg)
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [FFN_CLASSES["swiglu"], FFN_CLASSES["moc"], FFN_CLASSES["swiglu"]]
    assert model.layers[1].mlp.cfg.group == "2:8"


@pytest.mark.parametrize("ffn", [{"kind": kind} for kind in KINDS] + [
    {"kind": "moc", "group": "2:8"},
    {"kind": "moc", "recompute": False, "placement": "post_silu"},
    {"kind": "moc", "checkpoint": True},
    {"kind": "swiglu", "checkpoint": True},
])
def test_backward_gives_finite_gradients_for_every_parameter(ffn):
    cfg = tiny(ffn=ffn)
    model = MoCTransformer(cfg)
    ids = random_ids(cfg, 2, 16)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_flash_attn_missing_is_a_clear_error():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(RuntimeError, match=r"flash_attn is not installed.*attention='sdpa'"):
        MoCTransformer(tiny(attention="flash_attn"))


# --- config: conversions and Hugging Face json --------------------------------------------------


def test_dict_roundtrip_through_json_and_replace():
    cfg = tiny(ffn={"kind": "moc", "k": 8}, ffn_overrides={1: {"kind": "swiglu"}}, tie_embeddings=True)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # layer keys become strings
    assert again == cfg and again.ffn_overrides == {1: {"kind": "swiglu"}}
    bigger = cfg.replace(d_model=128)
    assert bigger.d_model == 128 and bigger.head_dim == 32 and cfg.d_model == 64
    with pytest.raises(ValueError, match=r"ModelConfig\.n_heads = 7"):
        cfg.replace(n_heads=7)
    with pytest.raises(ValueError, match=r"no field\(s\) n_layer\b"):
        ModelConfig.from_dict({"n_layer": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3


def test_config_copies_the_callers_dicts():
    ffn = {"kind": "moc"}
    cfg = ModelConfig(ffn=ffn)
    ffn["kind"] = "nonsense"
    assert cfg.ffn == {"kind": "moc"}


def _write_hf(folder, **changes):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
          "intermediate_size": 688, "num_attention_heads": 8, "num_hidden_layers": 3,
          "num_key_value_heads": 4, "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "initializer_range": 0.01, "max_position_embeddings": 2048, "tie_word_embeddings": True}
    hf.update(changes)
    hf = {k: v for k, v in hf.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    return folder / "config.json"


def test_from_hf_json(tmp_path):
    path = _write_hf(tmp_path / "my-llama")
    cfg = ModelConfig.from_hf_json(path)
    assert cfg.name == "my-llama"
    assert (cfg.d_model, cfg.d_ffn, cfg.n_heads, cfg.n_layers, cfg.n_kv_heads, cfg.vocab_size) == (256, 688, 8, 3, 4, 1000)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.init_std, cfg.tie_embeddings) == (1e-5, 500000.0, 0.01, True)
    assert cfg.max_seq_len == 256  # max_position_embeddings is not the training length
    over = ModelConfig.from_hf_json(path.parent, max_seq_len=128, ffn={"kind": "moc"})
    assert over.max_seq_len == 128 and over.ffn == {"kind": "moc"}
    # optional keys may be missing: n_kv_heads falls back to n_heads
    plain = ModelConfig.from_hf_json(_write_hf(tmp_path / "plain", num_key_value_heads=None, rope_theta=None))
    assert plain.n_kv_heads == 8 and plain.rope_theta == 10000.0


def test_from_hf_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_hf_json(tmp_path / "nowhere" / "config.json")
    with pytest.raises(ValueError, match=r"'intermediate_size'"):
        ModelConfig.from_hf_json(_write_hf(tmp_path / "broken", intermediate_size=None))


# --- config: validation -------------------------------------------------------------------------

INVALID = [
    ({"name": ""}, r"ModelConfig\.name = ''"),
    ({"vocab_size": 0}, r"ModelConfig\.vocab_size = 0 .*integer >= 1"),
    ({"d_model": -512}, r"ModelConfig\.d_model = -512 "),
    ({"n_layers": 1.5}, r"ModelConfig\.n_layers = 1\.5 "),
    ({"n_heads": 0}, r"ModelConfig\.n_heads = 0 "),
    ({"d_ffn": True}, r"ModelConfig\.d_ffn = True "),
    ({"max_seq_len": 0}, r"ModelConfig\.max_seq_len = 0 "),
    ({"n_kv_heads": 0}, r"ModelConfig\.n_kv_heads = 0 "),
    ({"n_kv_heads": 3}, r"ModelConfig\.n_kv_heads = 3 .*divide n_heads = 8"),
    ({"n_heads": 7}, r"ModelConfig\.n_heads = 7 .*divide d_model = 512"),
    ({"d_model": 40, "n_heads": 8}, r"ModelConfig\.d_model = 40 .*head_dim .* = 5 must be even"),
    ({"rope_theta": 0}, r"ModelConfig\.rope_theta = 0 .*> 0"),
    ({"norm_eps": -1e-6}, r"ModelConfig\.norm_eps = -1e-06 "),
    ({"init_std": 0.0}, r"ModelConfig\.init_std = 0\.0 "),
    ({"attention": "xformers"}, r"ModelConfig\.attention = 'xformers' .*sdpa, flash_attn"),
    ({"tie_embeddings": "yes"}, r"ModelConfig\.tie_embeddings = 'yes' "),
    ({"ffn": "moc"}, r"ModelConfig\.ffn = 'moc' "),
    ({"ffn": {"kind": "moc", "topk": 3}}, r"ModelConfig\.ffn = .*unknown key\(s\) topk.*allowed keys: kind, k, group"),
    ({"ffn": {"d_ffn": 10}}, r"ModelConfig\.ffn = .*d_ffn.*set ModelConfig\.d_model / d_ffn"),
    ({"ffn_overrides": [1]}, r"ModelConfig\.ffn_overrides = \[1\] "),
    ({"ffn_overrides": {8: {"kind": "moc"}}}, r"ModelConfig\.ffn_overrides has layer index 8\b.*\[0, 8\)"),
    ({"ffn_overrides": {-1: {"kind": "moc"}}}, r"ModelConfig\.ffn_overrides has layer index -1\b"),
    ({"ffn_overrides": {0: {"bogus": 1}}}, r"ModelConfig\.ffn_overrides\[0\] = .*unknown key\(s\) bogus"),
    ({"ffn_overrides": {0: "moc"}}, r"ModelConfig\.ffn_overrides\[0\] = 'moc' "),
    # bad FFN values surface as FFNConfig's own errors, for the shared ffn and for one layer
    ({"ffn": {"kind": "moe"}}, r"FFNConfig\.kind = 'moe' "),
    ({"ffn": {"kind": "moc", "k": 5000}}, r"FFNConfig\.k = 5000 "),
    ({"ffn_overrides": {2: {"kind": "moc", "group": "3:2"}}}, r"FFNConfig\.group = '3:2' "),
]


@pytest.mark.parametrize("changes,message", INVALID, ids=[f"{i}-{'-'.join(c)}" for i, (c, _) in enumerate(INVALID)])
def test_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_ffn_config_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layer = 8 .*n_layers = 8"):
        ModelConfig().ffn_config(8)
