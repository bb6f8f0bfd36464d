"""Text generation with a static KV cache: greedy or sampled (temperature, top-p), a batch of
prompts of different lengths, stop tokens, and an optional CUDA graph for the decode step.

Prompts are left-padded into one (batch, longest prompt) block, so every row's next token lands
in the same cache column; pad slots are masked out of attention and RoPE positions count only a
row's real tokens, so a padded row decodes exactly as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from moc_lightning.models import MoCTransformer
from moc_lightning.models.kv_cache import KVCache

Prompts = Union[Sequence[Sequence[int]], torch.Tensor]


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # the new tokens of each row, without the stop token that ended it
    stopped: list[bool]  # whether the row ended on a stop token (else it reached max_new_tokens)
    prompt_lengths: list[int]


@dataclass(frozen=True)
class SamplingConfig:
    """greedy: argmax. Otherwise softmax(logits / temperature), cut to the smallest set of tokens
    whose probabilities sum to at least top_p, and sampled."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p} must be in (0, 1]")


def _prompt_rows(prompts: Prompts, lengths: Optional[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be (batch, length), got shape {tuple(prompts.shape)}")
        rows = prompts.tolist()
        if lengths is not None:  # right-padded input: row i is its first lengths[i] tokens
            if len(lengths) != len(rows):
                raise ValueError(f"{len(lengths)} lengths for {len(rows)} prompts")
            rows = [row[: int(n)] for row, n in zip(rows, lengths)]
    else:
        if lengths is not None:
            raise ValueError("lengths is only used with a (batch, length) prompt tensor")
        rows = [list(map(int, row)) for row in prompts]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("every prompt needs at least one token (e.g. the end-of-sequence id to start a document)")
    return rows


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, real, positions), each (batch, longest): pads first, RoPE positions 0.. on real tokens."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        real[i, width - len(row):] = True
    positions = (real.long().cumsum(1) - 1).clamp_min(0)
    return ids.to(device), real.to(device), positions.to(device)


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (batch,) from logits (batch, vocab)."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token if the tokens ranked above it sum to less than top_p (the first always stays)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = torch.where(before < sampling.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeStep:
    """One token per row through the model at a moving cache column, optionally compiled with
    torch.compile and/or captured as a CUDA graph.

    The inputs live in static buffers (ids, positions, slot) that `__call__` fills before running
    (or replaying) the step, so the captured graph reads each new token from the same addresses.
    compile: False, True (inductor in `compile_mode`; no cudagraphs mode: the CUDA graph is ours)
    or a torch.compile backend (name or callable). The step compiles as one graph (fullgraph): MoC layers reach their
    kernel through a custom op.
    """

    def __init__(self, model: MoCTransformer, cache: KVCache, cuda_graph: bool = False, warmup: int = 2,
                 compile: Union[bool, str, Callable] = False, compile_mode: str = "max-autotune-no-cudagraphs"):
        self.model, self.cache = model, cache
        device = cache.filled.device
        batch = cache.batch
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.real = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        self._capture_next = cuda_graph
        self._warmup = warmup
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
        self._step = self._eager_step
        if compile:
            backend = "inductor" if compile is True else compile
            options = {"mode": compile_mode} if backend == "inductor" else {}
            self._step = torch.compile(self._eager_step, backend=backend, fullgraph=True, dynamic=False, **options)

    def _eager_step(self, ids, positions, slot, real) -> torch.Tensor:
        return self.model.forward_cached(ids, self.cache, positions, slot, real)[:, -1]

    def _run(self) -> torch.Tensor:
        return self._step(self.ids, self.positions, self.slot, self.real)

    def _capture(self) -> None:
        # Warm up on a side stream (kernels compile, allocator settles); each warm-up step writes
        # the same cache column the first replay then overwrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self._warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        self.ids.copy_(ids.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        self.slot.fill_(slot)
        if self._capture_next:
            self._capture_next = False
            self._capture()
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model: MoCTransformer, prompts: Prompts, *, max_new_tokens: int, lengths: Optional[Sequence[int]] = None,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, generator: Optional[torch.Generator] = None,
             cuda_graph: bool = False, compile: Union[bool, str, Callable] = False) -> GenerationOutput:
    """Continue each prompt by up to max_new_tokens tokens.

    prompts: token-id lists (any lengths), or a (batch, length) tensor (with `lengths` when its
    rows are right-padded). A row ends at its first stop token. cuda_graph captures the one-token
    decode step once and replays it (CUDA only); compile runs it through torch.compile (see
    `DecodeStep`). MoC layers switched with
    `model.prepare_for_decode()` run their decode kernel in the steps of 1..8 rows.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 0")
    sampling = SamplingConfig(greedy=greedy, temperature=temperature, top_p=top_p)
    rows = _prompt_rows(prompts, lengths)
    device = model.embed_tokens.weight.device
    ids, real, positions = left_pad(rows, pad_id, device)
    batch, prompt_len = ids.shape
    out = GenerationOutput([[] for _ in rows], [False] * batch, [len(r) for r in rows])
    if max_new_tokens == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch, prompt_len + max_new_tokens)
        logits = model.forward_cached(ids, cache, positions, torch.arange(prompt_len, device=device), real)[:, -1]
        step = DecodeStep(model, cache, cuda_graph=cuda_graph, compile=compile)
        next_pos = positions[:, -1] + 1
        stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        produced = []
        for t in range(max_new_tokens):
            token = sample_next(logits, sampling, generator)
            hit = torch.isin(token, stop) & ~done if stop.numel() else torch.zeros_like(done)
            produced.append(torch.where(done | hit, -1, token))
            done |= hit
            # without stop tokens no row ends early: no host sync per token, the CPU runs ahead
            if t == max_new_tokens - 1 or (stop.numel() and bool(done.all())):
                break
            logits = step(token, next_pos + t, prompt_len + t)
        if produced:
            for i, row in enumerate(torch.stack(produced, 1).tolist()):
                kept = [tok for tok in row if tok >= 0]
                out.tokens[i] = kept
                out.stopped[i] = len(kept) < len(row)
    finally:
        model.train(was_training)
    return out
