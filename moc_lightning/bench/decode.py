"""MoC decoding: the FFN layer at the 1B shapes, and whole-model decoding, dense vs MoC.

    python3 -m moc_lightning.bench.decode [--batches 1,2,4,8] [--sweep] [--no-model] [--out FILE]

1. Correctness on fresh random inputs (GPU): the decode kernel against the plain PyTorch MoC FFN
   and a float64 reference, bf16 and float32, row Top-K and MoC_2:8, every batch size, and many
   calls in a row (the kernels' self-cleaning scratch).
2. The FFN layer alone at d 2048, d_ffn 5461, K 1024 (bf16), batch 1/2/4/8: dense eager, dense
   torch.compile (max-autotune-no-cudagraphs and reduce-overhead; the best is `dense_compiled`),
   the MoC and MoC_2:8 kernels launched eagerly and captured in a CUDA graph, each with its HBM
   floor (bytes it must read over the measured copy bandwidth: dense reads all three matrices,
   MoC all of W_gate and the union over the batch of the kept rows of W_up and W_down^T), and a
   Table-7-like breakdown of MoC (gate, Top-K, up+down, other), each part timed on its own.
3. Whole-model decoding of llama-1b with random weights (bf16; the kept channels of random weights
   are as good as any for timing), batch 1, 128 prompt + 128 new tokens, dense vs MoC: decode
   tokens/s of the eager step, the step in a CUDA graph, and the step torch.compile'd then put in
   a CUDA graph (the best dense baseline), and end-to-end generate() time.
--sweep first times a few launch configurations per batch size and keeps the fastest.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from moc_lightning.bench.common import Recorder, copy_bandwidth_gbs, floor_ms, rel_error, time_ms
from moc_lightning.ffn import FFNConfig, build_ffn
from moc_lightning.kernels import moc_decode as kernel

BENCH = "decode"
D, D_FFN, K = 2048, 5461, 1024
GROUP = (2, 8)


# --- timing helpers ------------------------------------------------------------------------------


def capture(fn: Callable[[], object], reps: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `reps` back-to-back calls of fn (after warm-up calls on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph


def graphed_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Time per call of fn replayed from a CUDA graph (no launch overhead, back-to-back calls)."""
    graph = capture(fn, reps)
    ms = time_ms(graph.replay) / reps
    del graph
    return ms


def fresh_inputs(rows: int, dtype: torch.dtype, n: int = 7) -> Callable[[], torch.Tensor]:
    """A call gives the next of n random (rows, D) inputs, round and round: a timed step sees a new
    input each call, as in decoding, so the MoC kernel's hint (the previous call's threshold) is a
    guess, never this call's own threshold. n is prime to the graphs' 20 calls."""
    xs = [torch.randn(rows, D, device="cuda", dtype=dtype) for _ in range(n)]
    turn = itertools.count()
    return lambda: xs[next(turn) % n]


def dense_ffn(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


# --- the FFN layer -------------------------------------------------------------------------------


class Layer:
    """One FFN layer's weights at the 1B shapes and the three modules sharing them."""

    def __init__(self, dtype: torch.dtype):
        dense_cfg = FFNConfig(kind="swiglu", d_model=D, d_ffn=D_FFN)
        with torch.device("cuda"):
            self.dense = build_ffn(dense_cfg).to(dtype)
            self.moc = build_ffn(dense_cfg.replace(kind="moc", k=K)).to(dtype)
            self.moc_group = build_ffn(dense_cfg.replace(kind="moc", group=f"{GROUP[0]}:{GROUP[1]}")).to(dtype)
        for module in (self.moc, self.moc_group):
            module.load_state_dict(self.dense.state_dict())
            module.prepare_for_decode()
        self.weights = (self.dense.gate_proj.weight, self.dense.up_proj.weight, self.dense.down_proj.weight)
        self.dtype = dtype

    def module(self, kind: str):
        return self.moc if kind == "moc" else self.moc_group

    def kept_union(self, x: torch.Tensor, kind: str) -> int:
        """Rows of W_up (and of W_down^T) the batch needs: the union of its tokens' kept channels."""
        g = F.linear(x, self.weights[0])
        if kind == "moc":
            idx = torch.topk(g, K, dim=-1).indices
        else:
            a, b = GROUP
            full = (D_FFN // b) * b
            idx = torch.topk(g[:, :full].reshape(x.shape[0], -1, b), a, dim=-1).indices
            idx = (idx + torch.arange(0, full, b, device=x.device)[:, None]).flatten(1)
            rest = D_FFN - full
            if rest:
                idx = torch.cat([idx, torch.topk(g[:, full:], min(a, rest), dim=-1).indices + full], 1)
        return int(torch.unique(idx).numel())


def reference64(layer: Layer, x: torch.Tensor, kind: str, ranked_g: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 MoC output; channels ranked by G rounded to the layer's dtype, ties to the lower index.

    ranked_g: the G to rank by instead of the float64 one (the kernel's own float32 G): in bf16, a
    channel whose G lies at a rounding boundary may round to the threshold's value in one and
    not the other, and one channel swapped at K 1024 moves the output by 2-4%."""
    wg, wu, wd = (w.double() for w in layer.weights)
    g64 = x.double() @ wg.T
    ranked = (g64 if ranked_g is None else ranked_g).to(layer.dtype).double()
    if kind == "moc":
        order = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :K]
    else:
        a, b = GROUP
        parts = []
        for start in range(0, D_FFN, b):
            stop = min(start + b, D_FFN)
            o = torch.argsort(ranked[:, start:stop], dim=1, descending=True, stable=True)[:, : min(a, stop - start)]
            parts.append(o + start)
        order = torch.cat(parts, 1)
    mask = torch.zeros_like(g64).scatter_(1, order, 1.0)
    return (F.silu(g64) * mask * (x.double() @ wu.T)) @ wd.T


def check_correctness(out: Recorder, batches: list[int]) -> bool:
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        layer = Layer(dtype)
        for kind in ("moc", "moc_2:8"):
            module = layer.module(kind)
            for rows in batches:
                x = torch.randn(rows, D, device="cuda", dtype=dtype)
                with torch.no_grad():
                    got = module(x)
                    module.prepare_for_decode(False)
                    plain = module(x)
                    module.prepare_for_decode(True)
                ref = reference64(layer, x, kind)
                err, plain_err = rel_error(got, ref), rel_error(plain, ref)
                name = f"correct/{kind}/{str(dtype).split('.')[-1]}/batch{rows}"
                ok &= out.check(name, err < tol and rel_error(got, plain) < 3 * tol, rel_err_vs_float64=err,
                                rel_err_vs_plain=rel_error(got, plain), plain_rel_err_vs_float64=plain_err)
        # Many calls in a row with fresh inputs, batch 1..8: the histogram clears itself, the
        # partials are rewritten (the old last-program-finishes kernel failed here once in 40 calls).
        module = layer.moc
        errs = []
        with torch.no_grad():
            for i in range(40):
                x = torch.randn(1 + i % 8, D, device="cuda", dtype=dtype)
                errs.append(rel_error(module(x), reference64(layer, x, "moc")))
        ok &= out.check(f"correct/moc/{str(dtype).split('.')[-1]}/40_calls", max(errs) < tol, max_rel_err=max(errs))
        del layer
        torch.cuda.empty_cache()
    return ok


SINGLE = dict(updown_block_d=2048, updown_warps=8, updown_block_c=64)  # whole rows, both tiles in flight at once
DOT = dict(use_dot=True, gate_block_c=32, gate_block_d=128)
# Candidates are changes to the current LAUNCH_CONFIGS / GROUPED_LAUNCH_CONFIGS entry (`dict()` is
# the entry itself), so they follow the defaults: stop 15's choices, programmatic dependent launch
# on for the row Top-K at batch 1 and for a:b groups at every batch.
WARPS8 = dict(updown_warps=8, updown_maxnreg=128)  # two 8-warp programs an SM
# Batch 2 on CUDA cores with whole rows, a token at a time (stop 20; the default since): the gate's
# channels and warps (stop 20's call 3, H200: 4 channels on 4 warps 30.4 us, 2 on 8 warps 32.0,
# 2 on 4 warps 30.7, 4 on 8 warps 34.0, 8 on 4 warps 33.6). Stop 20's sweeps (H200) also timed:
# - at batch 2: 16 row slots (+20 us), 4 slots (+2.3), 8 warps (+7.5); tensor cores' 64- and
#   16-channel up/down programs (57-60 us);
# - at batches 4 and 8, these kernels with 8 or 16 row slots, 4 or 8 warps, the select in the
#   up/down programs (63.7-1734 us against tensor cores' 61.6-66.3), and with batch 2's gate and
#   8-warp programs capped at 128 registers (60.4-104 against 61.6 at batch 4, 141-189 against
#   66.2 at 8; a:b 67.4-606 and 218-839 against 60.0 and 63.6): registers spill. Batch 4's row
#   Top-K took the 4-slot kernel (60.4 and 59.5 against 61.6 and 61.2); the rest stay on tensor cores.
# Batch 4 a token at a time since stop 20 (4 row slots; sweeps, H200: 8 slots +13.5 us, the gate
# on 8 channels +0.5; tensor cores' 128-column tiles +1.2-1.7, chained +3.4, 512-column tiles on 8
# warps +5.7).
# The rounds of kept rows software-pipelined, the default at batches 2 and 4 since stop 21 (H200,
# one sweep: batch 2 on 4 slots 29.9 us against 8 slots unpipelined 31.0, pipelined 32.4, 4 slots
# three deep 30.6; batch 4 58.4 against 60.8 unpipelined, 74.2 three deep, 2 slots three deep 63.0;
# batch 8 a token at a time, 4 slots two deep or 2 slots three deep, 141 and 178 against tensor
# cores' 66.4: its partial lives in memory, so the rounds do not pipeline). The other forms, timed again:
PIPELINED = {2: [dict(updown_rows=8, updown_stages=None), dict(updown_stages=3)], 4: [dict(updown_stages=None)]}
BY_TOKEN_GATE = [dict(gate_block_c=2, gate_warps=8), dict(gate_block_c=2), dict(gate_block_c=8)]
SWEEP_ROW = {
    # stop 15 (H200) timed more: 16-channel programs (28-32 us), 128-channel ones (25.7), the select
    # launched apart (25.5), 32 x 256 gate blocks (34.1); all slower than these. Stop 16's and 17's
    # sweeps (H200) also: pdl off (+1.1 us), finish blocks of 32 and 64 columns (+0.3 and more),
    # 8 warps uncapped (+4.2: one program an SM), an L2 prefetch of the rows the threshold hint
    # calls likely (bulk: +2.0, it held the threshold back 1.5 us; a line a thread: -0.1), and
    # with the top-R slots: 16-channel programs (8 slots +1.8, 16 slots +5.8), 64-channel ones
    # (+2.0), 8 slots on 2 warps (+1.6), the likely rows loaded before the threshold (+0.5 to +5).
    # Stop 18's calls (H200; the kernel variants in commits 21519f4 and ed07b63, since taken out),
    # against the default's 15.3-15.8 us: 131 programs of 42 channels on 64 lanes, about one an
    # SM (+1.05 on 4 warps, +0.9 on 8; 114 of 48: +0.9, +1.1; with half rounds +1.7), 261 of 21,
    # two on every SM (+2.9 to +3.4; 228 of 24 +0.5, 196 of 28 +0.4), rounds of few rows on half
    # the slots (+0.1 twice: the median program done 1.3 us sooner, the slowest not), no reads
    # past the kept rows (+0.8), 8 slots (+1.0), 8 warps capped (+0.9), the gate on 4 warps
    # (+0.3), on 4 channels a program (+0.1, +0.6) or on one (+2.4).
    1: [dict(), dict(updown_rows=8), dict(WARPS8), dict(pdl=False),
        # the gate (5.7 us against its 5.3 us floor): warps, and channels a program
        dict(gate_warps=4), dict(gate_block_c=4), dict(gate_block_c=1)],
    2: [dict(), *BY_TOKEN_GATE, dict(DOT, updown_block_d=128, select_here_rows=1, pdl=False), *PIPELINED[2]],
    4: [dict(), dict(gate_block_c=8), dict(DOT, gate_warps=4, updown_block_d=128, updown_rows=8), *PIPELINED[4]],
    # stop 21 (H200): the tensor cores' loops not pipelined (updown_stages 1) 99.0 us against 66.4
    8: [dict(DOT, updown_block_d=128), dict(DOT, updown_block_d=128, pdl=True),
        dict(DOT, updown_block_d=512, updown_warps=8)],
}
GROUP_DOT = dict(use_dot=True, updown_block_d=128)
# a:b at 4 and 8 until stop 21: 32-channel programs, 512-column gate tiles, Triton's pipelining
STOP20_GROUP_DOT = dict(updown_block_c=32, gate_block_d=512, updown_stages=None)
SWEEP_GROUP = {
    1: [dict(), dict(pdl=False), dict(updown_warps=8), dict(updown_warps=2), dict(finish_warps=2),
        dict(finish_block_d=32), dict(updown_block_c=32, updown_rows=8), dict(gate_block_d=1024),
        dict(SINGLE, updown_block_c=64, updown_rows=16, gate_block_d=1024, finish_block_d=32)],  # stop 14's: 21.3 us
    # batch 2 on CUDA cores since stop 20, whose sweeps (H200) also timed these kernels at 4 and 8
    # tokens (66.7-753 us against tensor cores' 60.1-63.9) and at 2: gate tiles of 512 (+1.8), 4
    # warps (+8.8), 16 row slots (+132)
    # stop 21 (H200): the rounds pipelined two deep gained nothing (28.1 us on 4 slots, 37.7 on 8, against 27.8)
    2: [dict(), dict(pdl=False), dict(updown_rows=4), dict(GROUP_DOT, updown_block_c=32, updown_warps=4, gate_block_d=512)],
    4: [dict(), dict(pdl=False), dict(updown_stages=None), dict(updown_stages=2), STOP20_GROUP_DOT],
    8: [dict(), dict(pdl=False), dict(updown_stages=None), dict(updown_stages=2), STOP20_GROUP_DOT],
}


def sweep(out: Recorder, layer: Layer, batches: list[int], deadline: float) -> None:
    """Time the candidate launch configs (CUDA-graphed) and install the fastest per batch size."""
    for grouped, table, candidates in ((False, kernel.LAUNCH_CONFIGS, SWEEP_ROW), (True, kernel.GROUPED_LAUNCH_CONFIGS, SWEEP_GROUP)):
        kind = "moc_2:8" if grouped else "moc"
        module = layer.module(kind)
        for rows in batches:
            nxt = fresh_inputs(rows, layer.dtype)
            best = None
            for change in candidates[rows]:
                if time.time() > deadline:
                    break
                cfg = dataclasses.replace(table[rows], **change)
                module.decode_layout.config = cfg
                try:
                    with torch.no_grad():
                        # A candidate must be right before it is timed: 20 fresh inputs (a race
                        # between programs shows as a wrong row now and then, not every call).
                        err = max(checked_error(layer, module, kind, rows) for _ in range(20))
                        if err >= 2e-2:
                            out.emit(f"sweep/{kind}/batch{rows}/wrong", err, "rel_err", config=change)
                            continue
                        ms = graphed_ms(lambda: module(nxt()))
                except Exception as exc:  # a config that does not compile or fit is skipped
                    out.emit(f"sweep/{kind}/batch{rows}/error", 0.0, "error", config=change, error=repr(exc)[:300])
                    continue
                out.emit(f"sweep/{kind}/batch{rows}", ms * 1e3, "us", config=change)
                if best is None or ms < best[0]:
                    best = (ms, cfg, change)
            module.decode_layout.config = None
            if best is not None:
                table[rows] = best[1]
                out.emit(f"sweep/{kind}/batch{rows}/chosen", best[0] * 1e3, "us", config=best[2])


def bench_ffn(out: Recorder, layer: Layer, batches: list[int], compile_modes: list[str]) -> bool:
    itemsize = layer.dtype.itemsize
    compiled = {mode: torch.compile(dense_ffn, mode=mode, dynamic=False) for mode in compile_modes}
    for rows in batches:
        nxt = fresh_inputs(rows, layer.dtype)
        x = nxt()
        ctx = dict(batch=rows, d_model=D, d_ffn=D_FFN, k=K, dtype=str(layer.dtype).split(".")[-1])
        io = 2 * rows * D * itemsize
        dense_bytes = 3 * D_FFN * D * itemsize + io
        dense_floor = floor_ms(dense_bytes)
        with torch.no_grad():
            eager = time_ms(lambda: layer.dense(nxt()))
            out.emit("ffn/dense_eager", eager * 1e3, "us", floor_us=dense_floor * 1e3, bytes=dense_bytes, **ctx)
            eager_graph = graphed_ms(lambda: layer.dense(nxt()))
            out.emit("ffn/dense_eager_cudagraph", eager_graph * 1e3, "us", floor_us=dense_floor * 1e3, **ctx)
            best = None
            for mode, fn in compiled.items():
                try:
                    t0 = time.time()
                    fn(x, *layer.weights)
                    fn(x, *layer.weights)
                    compile_s = time.time() - t0
                    ms = time_ms(lambda: fn(nxt(), *layer.weights))
                    out.emit(f"ffn/dense_compile_{mode}", ms * 1e3, "us", floor_us=dense_floor * 1e3, compile_s=compile_s, **ctx)
                    candidates = [(ms, mode)]
                    if mode != "reduce-overhead":  # its own graphs; the others can be captured in ours
                        ms_graph = graphed_ms(lambda: fn(nxt(), *layer.weights))
                        out.emit(f"ffn/dense_compile_{mode}_cudagraph", ms_graph * 1e3, "us", floor_us=dense_floor * 1e3, **ctx)
                        candidates.append((ms_graph, mode + "+cudagraph"))
                    for c in candidates:
                        if best is None or c[0] < best[0]:
                            best = c
                except Exception as exc:
                    out.emit(f"ffn/dense_compile_{mode}/error", 0.0, "error", error=repr(exc)[:300], **ctx)
            if best is not None:
                out.emit("ffn/dense_compiled", best[0] * 1e3, "us", floor_us=dense_floor * 1e3, mode=best[1], **ctx)
            for kind in ("moc", "moc_2:8"):
                module = layer.module(kind)
                kept = layer.kept_union(x, kind)
                moc_bytes = (D_FFN * D + 2 * kept * D) * itemsize + io
                moc_floor = floor_ms(moc_bytes)
                fields = dict(floor_us=moc_floor * 1e3, bytes=moc_bytes, kept_rows_union=kept, **ctx)
                launched = time_ms(lambda: module(nxt()))
                out.emit(f"ffn/{kind}_kernel", launched * 1e3, "us", **fields)
                graphed = graphed_ms(lambda: module(nxt()))
                out.emit(f"ffn/{kind}_kernel_cudagraph", graphed * 1e3, "us", of_floor=graphed / moc_floor,
                         speedup_vs_dense_compiled=(best[0] / graphed) if best else None,
                         speedup_vs_dense_eager=eager / graphed, speedup_vs_dense_eager_cudagraph=eager_graph / graphed,
                         **fields)
                breakdown(out, layer, module, x, kind, graphed, ctx)
    # Every launch above ran thousands of times, and the breakdown ran them out of order: check again,
    # ten fresh inputs each with the launch configs the figures were taken with.
    ok = True
    with torch.no_grad():
        for kind in ("moc", "moc_2:8"):
            module = layer.module(kind)
            for rows in batches:
                errs = [checked_error(layer, module, kind, rows) for _ in range(10)]
                ok &= out.check(f"correct/after_timing/{kind}/batch{rows}", max(errs) < 2e-2, max_rel_err_vs_float64=max(errs),
                                calls=len(errs))
    return ok


def checked_error(layer: Layer, module, kind: str, rows: int) -> float:
    """The relative error of one call on fresh inputs against float64. The row Top-K is checked
    against the channels its own G ranks first (left in the scratch), so that a wrong selection
    shows at once and a rounding-boundary swap (one in 80 calls, stop 15) does not."""
    x = torch.randn(rows, D, device="cuda", dtype=layer.dtype)
    got = module(x)
    own_g = module.decode_layout.scratch.g[:rows].clone() if kind == "moc" else None
    return rel_error(got, reference64(layer, x, kind, own_g))


def breakdown(out: Recorder, layer: Layer, module, x: torch.Tensor, kind: str, total_ms: float, ctx: dict) -> None:
    """Table 7: each launch timed alone (CUDA-graphed; the Top-K as its own select launch, which
    the batch-1 kernel folds into up_down), 'other' the rest of the total (negative where the whole
    step overlaps its launches better than they run alone)."""
    wg, wu = layer.weights[0], layer.weights[1]
    layout = module.decode_layout
    cfg = module.cfg
    parts = {}
    if kind == "moc":
        _, stages = kernel.decode_stages(x, wg, wu, layout.w_down_t, k=cfg.k, scratch=layout.scratch,
                                         launch_select=True)
        parts = {"gate": stages["gate"], "topk": stages["select"], "up_down": stages["updown"], "finish": stages["finish"]}
    else:  # the gate, selection, up and down in one launch; the row path's gate GEMV reads the same W_gate
        row_module = layer.moc
        _, stages = kernel.decode_stages(x, wg, wu, row_module.decode_layout.w_down_t, k=K,
                                         scratch=row_module.decode_layout.scratch, launch_select=True)
        parts = {"gate": stages["gate"]}
    scratch = layer.moc.decode_layout.scratch  # the row path's, which the gate launch counts into
    timed = {}
    for name, launch in parts.items():
        timed[name] = graphed_ms(launch)
        if name == "gate":
            # Its thousands of replays piled their counts into the histograms (until stop 15 the
            # select and up/down were then timed on thresholds from those counts, keeping few
            # rows): start the rest from one call's counts.
            torch.cuda.synchronize()
            scratch.clear_counts()
            launch()
    torch.cuda.synchronize()
    scratch.clear_counts()  # no finish ran after the last gate launch here
    if kind == "moc":
        # The launches timed alone are the step's: run once in order from clean counts, they give
        # its output bit for bit.
        step_out = module(x)
        staged, stages = kernel.decode_stages(x, wg, wu, layout.w_down_t, k=cfg.k, scratch=layout.scratch,
                                              launch_select=True)
        for launch in stages.values():
            launch()
        out.check(f"breakdown/{kind}/stages_give_the_step", torch.equal(staged, step_out), **ctx)
        other = total_ms - sum(timed.values())
    else:
        timed["topk_up_down"] = total_ms - timed["gate"]
        other = 0.0
    for name, ms in timed.items():
        out.emit(f"breakdown/{kind}/{name}", ms * 1e3, "us", **ctx)
    out.emit(f"breakdown/{kind}/other", other * 1e3, "us", total_us=total_ms * 1e3, **ctx)


# --- whole-model decoding --------------------------------------------------------------------------


def check_model_float32(out: Recorder, prompt_len: int) -> bool:
    """A 4-layer llama-1b-shaped MoC model in float32: one decode step with the kernel vs the plain path."""
    from moc_lightning.models import ModelConfig, MoCTransformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-1b", n_layers=4, ffn={"kind": "moc", "topk_backend": "torch"})
    with torch.device("cuda"):
        model = MoCTransformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, prompt_len), device="cuda")
    span = torch.arange(prompt_len, device="cuda")
    results = []
    with torch.no_grad():
        for enable in (True, False):
            model.prepare_for_decode(enable)
            cache = model.new_cache(2, prompt_len + 1)
            model.forward_cached(prompt, cache, span.expand(2, -1), span)
            results.append(model.forward_cached(prompt[:, -1:], cache, torch.full((2, 1), prompt_len, device="cuda"),
                                                span[-1:] + 1))
    err = rel_error(*results)
    del model
    torch.cuda.empty_cache()
    return out.check("correct/model/moc_float32_step_logits_vs_plain", err < 1e-4, rel_err=err, layers=4, batch=2)


def bench_attention(out: Recorder, length: int, filled: int, batches: list[int]) -> bool:
    """One llama-1b layer's decode attention (32 heads of 64, bf16) over a cache of `length` slots
    of which the first `filled` are written: SDPA with its mask (the backend it picks, and each
    backend forced) against the split-cache kernel, each from a CUDA graph of back-to-back calls
    that walk 32 caches (as the layers do: a cache is not still in L2 when its layer comes back),
    with the floor: the written keys and values, q and the output, over the copy bandwidth."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moc_lightning.kernels import decode_attention as da

    heads, head_dim, caches = 32, 64, 32
    ok = True
    for batch in batches:
        kv = [(torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16),
               torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16)) for _ in range(caches)]
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        allowed = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
        allowed[:, :filled] = True
        mask = allowed[:, None, None, :]
        turn = itertools.count()

        def kernel_call():
            keys, values = kv[next(turn) % caches]
            return da.decode_attention(q, keys, values, allowed)

        def sdpa_call():
            keys, values = kv[next(turn) % caches]
            return F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                                  attn_mask=mask)[:, :, 0]

        ctx = dict(batch=batch, heads=heads, head_dim=head_dim, cache=length, filled=filled, dtype="bfloat16")
        keys, values = kv[0]
        scores = torch.einsum("bhd,blhd->bhl", q.double(), keys.double()) / head_dim**0.5
        ref = torch.einsum("bhl,blhd->bhd", scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1),
                           values.double())
        turn = itertools.count()  # the first call reads kv[0]
        err = rel_error(kernel_call(), ref)
        ok &= out.check(f"correct/attention/batch{batch}/kernel_vs_float64", err < 1e-2, rel_err=err, **ctx)
        floor = floor_ms(2 * (2 * batch * filled * heads * head_dim + 2 * batch * heads * head_dim)) * 1e3
        kernel_us = graphed_ms(kernel_call, reps=caches) * 1e3
        out.emit(f"attention/batch{batch}/kernel", kernel_us, "us", floor_us=floor, of_floor=kernel_us / floor,
                 pieces=da.DEFAULT_LAUNCH.pieces(batch * heads, length)[0], **ctx)
        # the model's call: RoPE on q and the new k, the cache written at slot `filled`, then attention
        k_new, v_new = (torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cos, sin = (torch.rand(batch, head_dim, device="cuda") for _ in range(2))
        slot = torch.tensor([filled], device="cuda")

        def step_call():
            keys, values = kv[next(turn) % caches]
            return da.decode_attention_step(q, k_new, v_new, cos, sin, keys, values, allowed, slot)

        step_us = graphed_ms(step_call, reps=caches) * 1e3
        out.emit(f"attention/batch{batch}/kernel_step", step_us, "us", floor_us=floor, of_floor=step_us / floor,
                 note="with RoPE of q and k and the cache write", **ctx)
        for label, backends in (("sdpa", None), ("sdpa_cudnn", [SDPBackend.CUDNN_ATTENTION]),
                                ("sdpa_efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("sdpa_math", [SDPBackend.MATH])):
            try:
                if backends is None:
                    us = graphed_ms(sdpa_call, reps=caches) * 1e3
                else:
                    with sdpa_kernel(backends):
                        us = graphed_ms(sdpa_call, reps=caches) * 1e3
            except Exception as exc:  # a backend that does not take these inputs
                out.emit(f"attention/batch{batch}/{label}/error", 0.0, "error", error=repr(exc)[:200], **ctx)
                continue
            out.emit(f"attention/batch{batch}/{label}", us, "us", floor_us=floor, kernel_speedup=us / kernel_us, **ctx)
        del kv
        torch.cuda.empty_cache()
    return ok


MODEL_MODES = ("eager", "cudagraph", "compiled_cudagraph")


def bench_model(out: Recorder, prompt_len: int, new_tokens: int, compile_mode: str,
                attentions: tuple[str, ...] = ("kernel",), modes: tuple[str, ...] = MODEL_MODES) -> None:
    """llama-1b decode tokens/s of dense, MoC and MoC_2:8, each step's attention by the split-cache
    kernel ("kernel", as `prepare_for_decode` sets it) or by SDPA ("sdpa"); then each MoC kind's
    ratio to dense in the same mode and attention."""
    from moc_lightning.inference import DecodeStep, generate
    from moc_lightning.models import ModelConfig, MoCTransformer
    from moc_lightning.models.config import FFN_KEYS

    torch.manual_seed(0)
    prompt = torch.randint(0, 32000, (1, prompt_len), device="cuda")
    rates: dict[tuple[str, str, str], float] = {}
    for kind, group in (("swiglu", None), ("moc", None), ("moc", "2:8")):
        # The 128-token prefill of MoC runs the plain PyTorch path (not timed on its own here).
        ffn = {"kind": kind, "topk_backend": "torch", **({"moc_kernel": "torch"} if "moc_kernel" in FFN_KEYS else {}),
               **({"group": group} if group else {})}
        cfg = ModelConfig.from_preset("llama-1b", ffn=ffn, max_seq_len=prompt_len + new_tokens)
        with torch.device("cuda"):
            model = MoCTransformer(cfg).to(torch.bfloat16).eval()
        model.prepare_for_decode()
        kind = kind if group is None else f"moc_{group}"
        ctx = dict(model="llama-1b", ffn=model.layers[0].mlp.cfg.label, weights="random", batch=1, prompt=prompt_len,
                   new_tokens=new_tokens, dtype="bfloat16")
        with torch.no_grad():
            if kind == "swiglu":  # one decode step: the attention kernel, SDPA's path, both against float64
                from moc_lightning.kernels import decode_attention as da

                def one_step(m: MoCTransformer, kernel: bool) -> torch.Tensor:
                    m.prepare_for_decode(kernel)
                    span = torch.arange(prompt_len, device="cuda")
                    cache = m.new_cache(1, prompt_len + 1)
                    m.forward_cached(prompt, cache, span[None], span)
                    return m.forward_cached(prompt[:, -1:], cache, torch.full((1, 1), prompt_len, device="cuda"),
                                            torch.tensor([prompt_len], device="cuda")).double()

                launched, run_step = [], da.decode_attention_step
                da.decode_attention_step = lambda *a, **kw: launched.append(1) or run_step(*a, **kw)  # count the layers
                try:
                    with_kernel, with_sdpa = one_step(model, True), one_step(model, False)
                finally:
                    da.decode_attention_step = run_step
                model.prepare_for_decode(True)
                # bf16 through 24 random layers drifts a few % from float64 whichever attention runs
                # (stop 19, H200: 0.0250 the kernel, 0.0249 cuDNN's SDPA), so the check is the kernel's
                # drift against SDPA's, not a fixed tolerance.
                reference = copy.deepcopy(model).double()
                exact = one_step(reference, False)
                del reference
                drift_kernel, drift_sdpa = rel_error(with_kernel, exact), rel_error(with_sdpa, exact)
                out.check("correct/model/swiglu_bf16_step_logits_attention_kernel_vs_float64",
                          drift_kernel <= 1.25 * drift_sdpa and len(launched) == cfg.n_layers, rel_err=drift_kernel,
                          sdpa_rel_err=drift_sdpa, kernel_vs_sdpa=rel_error(with_kernel, with_sdpa),
                          kernel_layers=len(launched), **ctx)
            if kind == "moc":  # one decode step, kernels vs plain path, same cache contents
                cache = model.new_cache(1, prompt_len + 1)
                model.forward_cached(prompt, cache, torch.arange(prompt_len, device="cuda")[None], torch.arange(prompt_len, device="cuda"))
                pos = torch.full((1, 1), prompt_len, device="cuda")
                slot = torch.tensor([prompt_len], device="cuda")
                with_kernel = model.forward_cached(prompt[:, -1:], cache, pos, slot)
                model.prepare_for_decode(False)
                plain = model.forward_cached(prompt[:, -1:], cache, pos, slot)
                model.prepare_for_decode(True)
                # bf16: ties of the rounded gate are broken differently (lowest index vs torch.topk's
                # choice) and 24 random layers amplify that; the float32 check below is the strict one.
                out.emit("model/moc/bf16_step_logits_rel_diff_vs_plain", rel_error(with_kernel.float(), plain.float()),
                         "rel", **ctx)
            for attention in attentions:
                for layer in model.layers:
                    layer.self_attn.decode_kernel = attention == "kernel"
                name = f"model/{kind}/attn_{attention}"
                # eager launches; the eager step captured in a CUDA graph; torch.compile'd (inductor in
                # compile_mode; the kernels as custom ops) and then captured.
                for label in modes:
                    graph, compiled = label != "eager", label == "compiled_cudagraph"
                    try:
                        t_build = time.perf_counter()
                        cache = model.new_cache(1, prompt_len + new_tokens)
                        logits = model.forward_cached(prompt, cache, torch.arange(prompt_len, device="cuda")[None],
                                                      torch.arange(prompt_len, device="cuda"))[:, -1]
                        step = DecodeStep(model, cache, cuda_graph=graph, compile=compiled, compile_mode=compile_mode)
                        first = torch.full((1,), prompt_len, device="cuda")  # positions stay on the device: no sync
                        logits = step(logits.argmax(-1), first, prompt_len)  # the first step compiles / captures
                        torch.cuda.synchronize()
                        build_s = time.perf_counter() - t_build
                        t0 = time.perf_counter()
                        for t in range(1, new_tokens):
                            logits = step(logits.argmax(-1), first + t, prompt_len + t)
                        torch.cuda.synchronize()
                        elapsed = time.perf_counter() - t0
                    except Exception as exc:  # e.g. a compile failure: record it, time the rest
                        traceback.print_exc()
                        out.emit(f"{name}/decode_{label}/error", 0.0, "error", error=repr(exc)[:300], **ctx)
                        continue
                    rates[kind, attention, label] = (new_tokens - 1) / elapsed
                    out.emit(f"{name}/decode_tokens_per_s_{label}", rates[kind, attention, label], "tokens/s",
                             ms_per_token=elapsed / (new_tokens - 1) * 1e3, first_step_s=build_s, **ctx)
                    del step, cache
                    if compiled:
                        continue
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    generate(model, prompt, max_new_tokens=new_tokens, cuda_graph=graph)
                    torch.cuda.synchronize()
                    out.emit(f"{name}/generate_s_{label}", time.perf_counter() - t0, "s",
                             note="prefill + graph capture + decode", **ctx)
        del model
        torch.cuda.empty_cache()
    for (kind, attention, label), rate in rates.items():
        dense = rates.get(("swiglu", attention, label))
        if kind != "swiglu" and dense:
            out.emit(f"model/{kind}/attn_{attention}/vs_dense_{label}", rate / dense, "x", tokens_per_s=rate,
                     dense_tokens_per_s=dense)


def section(out: Recorder, name: str, run: Callable[[], object]) -> bool:
    """Run one part; a failure is recorded (with its traceback on stderr) and the next part runs."""
    t0 = time.time()
    try:
        result = run()
    except Exception as exc:
        traceback.print_exc()
        out.emit(f"{name}/error", 0.0, "error", error=repr(exc)[:500])
        return False
    out.emit(f"{name}/wall_s", time.time() - t0, "s")
    return result is not False


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4,8", help="decode batch sizes (1..8), comma-separated")
    parser.add_argument("--sweep", action="store_true", help="time alternative launch configs first, keep the best")
    parser.add_argument("--sweep-seconds", type=float, default=120.0, help="time limit of the sweep")
    parser.add_argument("--compile-modes", default="max-autotune-no-cudagraphs,reduce-overhead",
                        help="torch.compile modes for the dense baseline (comma-separated; '' for none)")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model decode")
    parser.add_argument("--model-compile-mode", default="default",
                        help="torch.compile mode of the whole-model decode step (the default mode leaves its "
                             "GEMVs to cuBLAS; max-autotune-no-cudagraphs also tries Triton's)")
    parser.add_argument("--attention", default="kernel",
                        help="the model steps' attention, comma-separated: kernel (the split-cache kernel, what "
                             "prepare_for_decode sets), sdpa")
    parser.add_argument("--model-modes", default=",".join(MODEL_MODES),
                        help=f"whole-model decode modes, comma-separated, of {', '.join(MODEL_MODES)}")
    parser.add_argument("--attention-bench", default="1,8",
                        help="batches of the attention alone (llama-1b layer, 256-slot cache); '' for none")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    attentions = tuple(a for a in args.attention.split(",") if a)
    model_modes = tuple(m for m in args.model_modes.split(",") if m)
    if not set(attentions) <= {"kernel", "sdpa"} or not set(model_modes) <= set(MODEL_MODES):
        raise SystemExit(f"--attention takes kernel and/or sdpa, --model-modes some of {', '.join(MODEL_MODES)}")
    if not torch.cuda.is_available():
        raise SystemExit("moc_lightning.bench.decode needs a CUDA GPU")
    out = Recorder(BENCH, args.out)
    batches = [int(b) for b in args.batches.split(",") if b]
    start = time.time()
    torch.manual_seed(0)
    out.emit("copy_bandwidth", copy_bandwidth_gbs(), "GB/s")
    ok = section(out, "correctness", lambda: check_correctness(out, batches))
    layer = Layer(torch.bfloat16)
    if args.sweep:
        section(out, "sweep", lambda: sweep(out, layer, batches, time.time() + args.sweep_seconds))
    modes = [m for m in args.compile_modes.split(",") if m]
    ok &= section(out, "ffn", lambda: bench_ffn(out, layer, batches, modes))
    del layer
    torch.cuda.empty_cache()
    if not args.no_model:
        ok &= section(out, "model_check", lambda: check_model_float32(out, args.prompt))
        attention_batches = [int(b) for b in args.attention_bench.split(",") if b]
        if attention_batches:
            ok &= section(out, "attention", lambda: bench_attention(out, args.prompt + args.new_tokens,
                                                                   args.prompt + args.new_tokens // 2, attention_batches))
        section(out, "model", lambda: bench_model(out, args.prompt, args.new_tokens, args.model_compile_mode,
                                                  attentions, model_modes))
    out.emit("wall_s", time.time() - start, "s", launch_configs={str(k): dataclasses.asdict(v) for k, v in kernel.LAUNCH_CONFIGS.items()},
             grouped_launch_configs={str(k): dataclasses.asdict(v) for k, v in kernel.GROUPED_LAUNCH_CONFIGS.items()})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
