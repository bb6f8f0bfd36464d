"""The decode attention kernels (Triton, run by the interpreter on CPU) against float64 attention:
grouped heads, several cache pieces, masked slots never read, bf16, a head_dim that is not a power
of two; the model's fused step (RoPE, the cache write at the slot, the mask from the filled slots)
against the plain path; launch arithmetic; inputs refused with clear errors; and a model decoding
with it generating what SDPA's path generates, through torch.compile's custom op, in place."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates anything: CPU tensors, no GPU

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (CI installs triton: a missing one must fail here, not skip)

from moc_lightning.inference import generate  # noqa: E402
from moc_lightning.kernels import decode_attention as da  # noqa: E402
from moc_lightning.models import ModelConfig, MoCTransformer  # noqa: E402
from moc_lightning.models.transformer import RotaryTables, apply_rotary  # noqa: E402
from without_triton import run_without_triton  # noqa: E402

f64 = torch.float64


def reference(q, keys, values, allowed):
    """float64 softmax attention written out: one query per (row, head), k/v head h // group."""
    group = q.shape[1] // keys.shape[2]
    k = keys.to(f64).repeat_interleave(group, dim=2)  # (b, L, H, D)
    v = values.to(f64).repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.to(f64), k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("bhl,blhd->bhd", scores.softmax(-1), v)


def inputs(batch=2, heads=4, kv_heads=2, head_dim=16, length=37, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    keys = torch.randn(batch, length, kv_heads, head_dim, generator=gen).to(dtype)
    values = torch.randn(batch, length, kv_heads, head_dim, generator=gen).to(dtype)
    allowed = torch.rand(batch, length, generator=gen) < 0.6
    allowed[:, 0] = True
    return q, keys, values, allowed


@pytest.mark.parametrize("launch", [da.AttentionLaunch(block_l=8, target_programs=40),  # 5 pieces of 8
                                    da.AttentionLaunch(block_l=64),  # one piece, one ragged tile
                                    da.AttentionLaunch(block_l=4, target_programs=10_000)])  # a piece a tile
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_matches_float64_attention(launch, heads, kv_heads):
    q, keys, values, allowed = inputs(heads=heads, kv_heads=kv_heads)
    allowed[1, 9:] = False  # row 1: every piece after the first holds nothing it may read
    out = da.decode_attention(q, keys, values, allowed, launch=launch)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.to(f64), reference(q, keys, values, allowed), rtol=1e-5, atol=1e-6)


def test_forbidden_slots_are_not_read():
    """NaN keys and values in the slots the mask forbids (a cache not yet written) change nothing."""
    q, keys, values, allowed = inputs()
    poisoned_k, poisoned_v = keys.clone(), values.clone()
    poisoned_k[~allowed] = float("nan")
    poisoned_v[~allowed] = float("nan")
    out = da.decode_attention(q, poisoned_k, poisoned_v, allowed, launch=da.AttentionLaunch(block_l=8))
    torch.testing.assert_close(out.to(f64), reference(q, keys, values, allowed), rtol=1e-5, atol=1e-6)


def test_bf16_and_a_head_dim_that_is_not_a_power_of_two():
    q, keys, values, allowed = inputs(head_dim=24, dtype=torch.bfloat16, length=50)
    q_strided = torch.randn(2, 4, 48, dtype=torch.bfloat16)[..., ::2]  # a query without unit stride
    q_strided.copy_(q)
    out = da.decode_attention(q_strided, keys, values, allowed, launch=da.AttentionLaunch(block_l=16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.to(f64), reference(q, keys, values, allowed), rtol=2e-2, atol=1e-2)


def test_a_mask_view_with_strides_and_an_explicit_scale():
    q, keys, values, allowed = inputs()
    mask = allowed[:, None, None, :].expand(2, 1, 3, allowed.shape[1])[:, 0, 1]  # like cache.mask[:, 0, 0]
    out = da.decode_attention(q, keys, values, mask, scale=1.0 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(out.to(f64), reference(q, keys, values, allowed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,length,block_l,target", [(32, 259, 32, 264), (256, 259, 32, 264), (1, 5, 32, 264),
                                                         (4, 1000, 16, 64)])
def test_pieces_cover_the_cache_in_whole_tiles(heads, length, block_l, target):
    pieces, chunk = da.AttentionLaunch(block_l=block_l, target_programs=target).pieces(heads, length)
    assert chunk % block_l == 0
    assert (pieces - 1) * chunk < length <= pieces * chunk  # every slot in one piece, no empty piece
    assert pieces == 1 or heads * pieces <= target + heads  # about the programs asked for


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, a: (q[0], k, v, a), "q must be"),
    (lambda q, k, v, a: (q, k, v[..., :8], a), "one .* shape"),
    (lambda q, k, v, a: (q[:, :3], k, v, a), "heads a multiple of kv_heads"),
    (lambda q, k, v, a: (q, k, v, a.float()), "bool"),
    (lambda q, k, v, a: (q, k, v, a[:, :5]), "bool"),
    (lambda q, k, v, a: (q.double(), k, v, a), "share a dtype"),
    (lambda q, k, v, a: (q, torch.randn(*k.shape[:3], 2 * k.shape[3])[..., ::2], v, a), "contiguous last dimension"),
])
def test_bad_inputs_are_refused_with_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        da.decode_attention(*change(*inputs()))


def test_a_head_wider_than_the_kernel_takes_is_refused():
    q, keys, values, allowed = inputs(head_dim=da.MAX_HEAD_DIM * 2, length=4)
    with pytest.raises(ValueError, match="wider than the kernel takes"):
        da.decode_attention(q, keys, values, allowed)


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        da.decode_attention(*inputs())


def test_bad_launch_settings_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        da.AttentionLaunch(block_l=24)
    with pytest.raises(ValueError, match="at least 1"):
        da.AttentionLaunch(target_programs=0)


def step_inputs(dtype=torch.float32, heads=4, kv_heads=2, head_dim=16, length=37, slot=20, seed=1):
    q, keys, values, filled = inputs(heads=heads, kv_heads=kv_heads, head_dim=head_dim, length=length, dtype=dtype,
                                     seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    k = torch.randn(2, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(2, kv_heads, head_dim, generator=gen).to(dtype)
    filled[0, slot] = False  # row 0's query is a pad: it still sees its own slot
    filled[:, slot + 3:] = True  # later slots, marked filled, must not count either
    cos, sin = RotaryTables(head_dim, 64, 10000.0).at(torch.tensor([[slot], [slot - 4]]))  # left padding
    return q, k, v, cos[:, 0], sin[:, 0], keys, values, filled, torch.tensor([slot])


def step_reference(q, k, v, cos, sin, keys, values, filled, slot):
    """The plain path: apply_rotary, the cache written at the slot, float64 attention over the
    filled slots up to it and the slot itself."""
    q = apply_rotary(q[:, None], cos[:, None], sin[:, None])[:, 0]
    keys, values = keys.clone(), values.clone()
    keys[:, slot] = apply_rotary(k[:, None], cos[:, None], sin[:, None])
    values[:, slot] = v[:, None]
    at = torch.arange(keys.shape[1])
    allowed = (filled & (at <= slot)) | (at == slot)
    return reference(q, keys, values, allowed), keys, values


@pytest.mark.parametrize("launch", [da.AttentionLaunch(block_l=8, target_programs=40), da.AttentionLaunch()])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_step_rotates_writes_the_slot_and_attends(launch, kv_heads):
    args = step_inputs(kv_heads=kv_heads)
    ref, ref_keys, ref_values = step_reference(*args)
    q, k, v, cos, sin, keys, values, filled, slot = args
    untouched_k, untouched_v = keys.clone(), values.clone()
    out = da.decode_attention_step(q, k, v, cos, sin, keys, values, filled, slot, launch=launch)
    torch.testing.assert_close(out.to(f64), ref, rtol=1e-5, atol=1e-6)
    # the cache: the slot holds the rotated k and the v, for every kv head; nothing else moved
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    other = torch.arange(keys.shape[1]) != int(slot)
    assert torch.equal(keys[:, other], untouched_k[:, other]) and torch.equal(values[:, other], untouched_v[:, other])


def test_step_counts_neither_later_slots_nor_the_old_contents_of_its_own():
    args = list(step_inputs())
    ref, _, _ = step_reference(*args)
    keys, values, filled, slot = args[5:]
    later = torch.arange(keys.shape[1]) > int(slot)
    for cache in (keys, values):
        cache[:, later] = float("nan")
        cache[:, int(slot)] = float("nan")  # this step's k and v come from the new projections
        cache[~filled] = float("nan")
    out = da.decode_attention_step(*args)
    torch.testing.assert_close(out.to(f64), ref, rtol=1e-5, atol=1e-6)


def test_step_in_bf16():
    """bf16 (the interpreter rounds float32 to bf16 its own way, so the rotated k may differ from
    PyTorch's by one bf16 step: the kernel on the GPU is checked by the benchmark)."""
    args = step_inputs(dtype=torch.bfloat16, head_dim=24)
    ref, ref_keys, _ = step_reference(*args)
    out = da.decode_attention_step(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.to(f64), ref, rtol=3e-2, atol=2e-2)
    torch.testing.assert_close(args[5].float(), ref_keys.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(1, a[1][:, :1]), "k and v must be"),
    (lambda a: a.__setitem__(2, a[2].double()), "k and v must be"),
    (lambda a: a.__setitem__(3, a[3].double()), "cos must be float32"),
    (lambda a: a.__setitem__(4, a[4][:1]), "sin must be float32"),
    (lambda a: a.__setitem__(7, a[7].int()), "filled must be a bool"),
    (lambda a: a.__setitem__(8, torch.tensor([3, 4])), "one-element integer"),
    (lambda a: a.__setitem__(8, torch.tensor([3.0])), "one-element integer"),
])
def test_bad_step_inputs_are_refused_with_a_clear_error(change, message):
    args = list(step_inputs())
    change(args)
    with pytest.raises(ValueError, match=message):
        da.decode_attention_step(*args)


def test_step_refuses_an_odd_head_dim():
    args = list(step_inputs(head_dim=15))
    args[3], args[4] = torch.zeros(2, 15), torch.zeros(2, 15)
    with pytest.raises(ValueError, match="must be even"):
        da.decode_attention_step(*args)


def tiny_dense_model(**overrides) -> MoCTransformer:
    torch.manual_seed(0)
    return MoCTransformer(ModelConfig.from_preset("llama-tiny", ffn={"kind": "swiglu"}, **overrides)).eval()


def test_a_model_decodes_with_the_kernel_as_with_sdpa(monkeypatch):
    """Greedy tokens with and without the kernel; every one-token step of every layer used it,
    the multi-token prefill did not."""
    # heads x head_dim (512) wider than one head may be (the first version asked that of q's
    # last dimension, so llama-1b never took the kernel while llama-tiny did)
    model = tiny_dense_model(d_model=512, n_heads=8, n_kv_heads=4)
    assert model.cfg.n_heads * model.cfg.head_dim > da.MAX_HEAD_DIM
    prompts = [[10, 12, 14, 16], [100, 101, 102, 103, 104, 105]]  # left padding: masked slots in row 0
    plain = generate(model, prompts, max_new_tokens=12)
    calls = []
    run = da.decode_attention_step
    monkeypatch.setattr(da, "decode_attention_step", lambda q, *a, **kw: calls.append(q.shape) or run(q, *a, **kw))
    assert model.prepare_for_decode() == 0  # a dense model: no FFN switched, the attention is
    assert all(layer.self_attn.decode_kernel for layer in model.layers)
    with_kernel = generate(model, prompts, max_new_tokens=12)
    assert with_kernel.tokens == plain.tokens
    assert calls == [(2, model.cfg.n_heads, model.cfg.head_dim)] * (11 * model.cfg.n_layers)
    model.prepare_for_decode(False)
    calls.clear()
    generate(model, prompts, max_new_tokens=3)
    assert calls == []


def test_inductor_writes_the_cache_in_place_through_the_step_op():
    """Compiled by inductor (on CPU here), the step calls the op on the cache tensors themselves:
    a mutating op the compiler could not re-inplace would copy each layer's cache every step, the
    copy that cost ~300 us a llama-1b step before stop 18 (there through views of one tensor)."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_dense_model()
    prompts = [list(range(10, 20))]
    plain = generate(model, prompts, max_new_tokens=4)
    model.prepare_for_decode()
    torch._dynamo.reset()
    try:
        compiled, codes = run_and_get_code(lambda: generate(model, prompts, max_new_tokens=4, compile=True))
    finally:
        torch._dynamo.reset()
    assert compiled.tokens == plain.tokens
    code = "\n".join(codes)
    assert code.count("moc_lightning.decode_attention_step.default(") == model.cfg.n_layers
    assert ".copy_(" not in code and "clone(" not in code


def test_without_triton_a_prepared_model_decodes_on_sdpa_and_the_kernel_refuses_clearly():
    code = (
        "import torch\n"
        "from moc_lightning.kernels import decode_attention as da\n"
        "from moc_lightning.inference import generate\n"
        "from moc_lightning.models import ModelConfig, MoCTransformer\n"
        "model = MoCTransformer(ModelConfig.from_preset('llama-tiny', ffn={'kind': 'swiglu'})).eval()\n"
        "plain = generate(model, [[1, 2, 3]], max_new_tokens=3).tokens\n"
        "model.prepare_for_decode()\n"
        "assert generate(model, [[1, 2, 3]], max_new_tokens=3).tokens == plain\n"
        "try:\n"
        "    da.decode_attention(torch.randn(1, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4),\n"
        "                        torch.ones(1, 3, dtype=torch.bool))\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    result = run_without_triton(code)
    assert result.returncode == 0, result.stderr[-2000:]
