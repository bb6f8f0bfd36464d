"""Decoding with the static KV cache: cached logits equal the full forward's, greedy generation
equals an argmax loop over full forwards, left padding changes nothing, stop tokens end a row,
sampling obeys its settings, and the MoC decode kernel (Triton interpreter) generates the same
tokens as the plain path for a small trained model."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the decode kernel runs on CPU tensors in the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from moc_lightning.inference import generate, sample_next, SamplingConfig  # noqa: E402
from moc_lightning.kernels import decode_attention  # noqa: E402
from moc_lightning.kernels.moc_decode import LaunchConfig  # noqa: E402
from moc_lightning.models import ModelConfig, MoCTransformer  # noqa: E402

# One program per kernel for the tiny model (d_ffn 172): the interpreter's cost is per program.
ONE_PROGRAM = LaunchConfig(gate_block_c=256, gate_block_d=64, updown_block_c=256, updown_block_d=64)
# The attention of a (row, head) in one program (the cache is 64 slots).
ONE_ATTENTION_PROGRAM = decode_attention.AttentionLaunch(block_l=64, target_programs=1)


def tiny_model(kind: str = "moc", seed: int = 0, **ffn) -> MoCTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("llama-tiny", ffn={"kind": kind, **ffn})
    return MoCTransformer(cfg).eval()


def argmax_loop(model: MoCTransformer, prompt: list[int], steps: int) -> list[int]:
    """The reference: recompute the full forward over all tokens at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["swiglu", "moc"])
def test_cached_logits_equal_full_forward(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        pieces = []
        for start, stop in ((0, 6), (6, 7), (7, 11)):  # a prefill, one token, a chunk
            span = torch.arange(start, stop)
            pieces.append(model.forward_cached(ids[:, start:stop], cache, span.expand(2, -1), span))
    cached = torch.cat(pieces, 1)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-4)


def test_left_padded_rows_decode_as_if_alone():
    model = tiny_model("swiglu")
    short, long = [5, 9, 2], [7, 1, 1, 4, 3, 8]
    both = generate(model, [short, long], max_new_tokens=8)
    assert both.prompt_lengths == [3, 6]
    assert both.tokens[0] == generate(model, [short], max_new_tokens=8).tokens[0]
    assert both.tokens[1] == generate(model, [long], max_new_tokens=8).tokens[0]
    # a right-padded tensor with per-row lengths is the same batch
    block = torch.tensor([short + [0, 0, 0], long])
    assert generate(model, block, lengths=[3, 6], max_new_tokens=8).tokens == both.tokens


@pytest.mark.parametrize("kind", ["swiglu", "moc"])
def test_greedy_generate_equals_argmax_loop(kind):
    model = tiny_model(kind)
    prompt = [3, 14, 15, 92, 65]
    out = generate(model, [prompt], max_new_tokens=12)
    assert out.tokens[0] == argmax_loop(model, prompt, 12)
    assert out.stopped == [False]


def test_stop_tokens_end_each_row_on_its_own():
    model = tiny_model("swiglu")
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = generate(model, prompts, max_new_tokens=10).tokens
    stop = free[0][3]
    first = free[0].index(stop)
    out = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free[0][:first] and out.stopped[0]
    if stop in free[1]:
        assert out.tokens[1] == free[1][: free[1].index(stop)] and out.stopped[1]
    else:
        assert out.tokens[1] == free[1] and not out.stopped[1]


def test_sampling_settings():
    model = tiny_model("swiglu")
    prompt = [[2, 7, 1, 8]]
    greedy = generate(model, prompt, max_new_tokens=6).tokens
    # top_p that small keeps only the most likely token: sampling becomes greedy
    assert generate(model, prompt, max_new_tokens=6, greedy=False, top_p=1e-6).tokens == greedy
    seeded = [generate(model, prompt, max_new_tokens=6, greedy=False, temperature=5.0,
                       generator=torch.Generator().manual_seed(7)).tokens for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0] != greedy
    logits = torch.tensor([[0.0, 3.0, 2.9, -9.0]])
    picks = {int(sample_next(logits, SamplingConfig(greedy=False, top_p=0.9), torch.Generator().manual_seed(i)))
             for i in range(30)}
    assert picks == {1, 2}  # p = .51, .46, .02, 0: the 0.9 nucleus is tokens 1 and 2
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, prompt, max_new_tokens=2, greedy=False, **bad)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        generate(model, prompt, max_new_tokens=2, cuda_graph=True)
    assert generate(model, prompt, max_new_tokens=0).tokens == [[]]


def train_briefly(model: MoCTransformer, steps: int = 40) -> None:
    """A few dozen AdamW steps on a learnable toy corpus (counting sequences with random strides),
    so that the model's predictions are confident rather than near-ties."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, 400, (16, 1), generator=gen)
        stride = torch.randint(1, 4, (16, 1), generator=gen)
        ids = (start + stride * torch.arange(48)) % model.cfg.vocab_size
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_decode_kernel_generates_the_same_tokens_as_the_plain_path(monkeypatch):
    monkeypatch.setattr(decode_attention, "DEFAULT_LAUNCH", ONE_ATTENTION_PROGRAM)
    model = tiny_model("moc", topk_backend="torch", moc_kernel="torch")
    train_briefly(model)
    prompts = [[10, 12, 14, 16], [100, 101, 102, 103, 104, 105]]
    plain = generate(model, prompts, max_new_tokens=64)
    assert model.prepare_for_decode() == model.cfg.n_layers
    calls = []
    for layer in model.layers:
        layer.mlp.decode_layout.config = ONE_PROGRAM
        layer.mlp.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[:-1]))
    with_kernel = generate(model, prompts, max_new_tokens=64)
    assert with_kernel.tokens == plain.tokens
    assert all(len(row) == 64 for row in plain.tokens)
    # the prefill (2 x 6 rows) took the plain path, every one-token step the kernel
    assert sum(shape.numel() <= 8 for shape in calls) == 63 * model.cfg.n_layers


def test_compiled_decode_step_reaches_the_kernel_through_its_custom_op(monkeypatch):
    """The decode step compiles as one graph (fullgraph: a graph break would raise), the MoC layers
    (and the attention) appear in it as the opaque ops moc_lightning::moc_decode (and
    decode_attention_step), the kernel runs, and the tokens equal
    the plain path's. The backend records Dynamo's graph and runs it as traced (no inductor build)."""
    import moc_lightning.ffn.decode as decode

    model = tiny_model("moc", topk_backend="torch", moc_kernel="torch")
    train_briefly(model)
    prompts = [list(range(10, 20))]  # a 10-token prefill: more than 8 rows, the plain path
    plain = generate(model, prompts, max_new_tokens=6)
    model.prepare_for_decode()
    launched, traced = [], []
    run_kernel = decode.kernel.moc_decode
    monkeypatch.setattr(decode.kernel, "moc_decode", lambda x, *a, **kw: launched.append(x.shape) or run_kernel(x, *a, **kw))

    def recording_backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        compiled = generate(model, prompts, max_new_tokens=6, compile=recording_backend)
    finally:
        torch._dynamo.reset()
    assert compiled.tokens == plain.tokens
    assert traced.count("moc_lightning.moc_decode.default") == model.cfg.n_layers
    # prepare_for_decode also sent every layer's attention to its kernel, as one op too
    assert traced.count("moc_lightning.decode_attention_step.default") == model.cfg.n_layers
    assert len(launched) == 5 * model.cfg.n_layers and all(shape == (1, model.cfg.d_model) for shape in launched)


def test_cache_keeps_a_tensor_a_layer_and_writes_the_step_in_place():
    """One tensor a layer, written in place at the step's slots: torch.compile turned writes
    through views of one (n_layers, ...) tensor into a copy of the whole cache every step."""
    from moc_lightning.models.kv_cache import KVCache

    cfg = ModelConfig.from_preset("llama-tiny", ffn={"kind": "swiglu"})
    cache = KVCache(cfg, batch=2, max_len=8)
    assert len(cache.keys) == len(cache.values) == cfg.n_layers
    k, v = torch.randn(2, 1, cfg.n_kv_heads, cfg.head_dim), torch.randn(2, 1, cfg.n_kv_heads, cfg.head_dim)
    keys, values = cache.write(1, torch.tensor([3]), k, v)
    assert keys is cache.keys[1] and values is cache.values[1]
    assert torch.equal(keys[:, 3], k[:, 0]) and torch.equal(values[:, 3], v[:, 0])
    assert not keys[:, :3].any() and not keys[:, 4:].any()
    assert not cache.keys[0].any() and not cache.values[0].any()
