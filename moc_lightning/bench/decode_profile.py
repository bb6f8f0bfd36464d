"""Where a decode step's time goes, kernel by kernel: dense SwiGLU against MoC and MoC_2:8.

    python -m moc_lightning.bench.decode_profile [--model llama-1b] [--prompt 128] [--steps 10]
                                                 [--top 12] [--attention kernel|sdpa] [--out F]

For each FFN kind it builds the model with random weights (bf16 on a GPU), prefills a random
prompt and runs the one-token decode step as `generate` does on a GPU (`DecodeStep`: the step
torch.compile'd in inductor's default mode, then captured in a CUDA graph). torch.profiler
records `--steps` steps; the JSON lines give each kernel's time per step (the `--top` largest,
with how many times a step launches it), the kernels' sum, and the wall time per step.

Reading it: with programmatic dependent launch (the MoC kernels on sm_90) a kernel starts
before the one it depends on ends and waits, so its span holds part of the other's, and the
MoC kernels' spans add up to more than the layer takes; the wall time per step is the figure to
compare. On a machine without a GPU (the tests) the step runs eagerly in float32 and the
profile lists CPU operators instead of kernels.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Optional

import torch

from moc_lightning.bench.common import Recorder

BENCH = "decode_profile"
KINDS = (("swiglu", None), ("moc", None), ("moc", "2:8"))
WARM_STEPS = 3  # decode steps before the profile: the first compiles and captures


def cache_length(prompt: int, steps: int) -> int:
    """Cache slots a profile needs: the prompt, the warm-up steps, the profiled and the timed steps."""
    return prompt + WARM_STEPS + 2 * steps


def profile_step(model, prompt: torch.Tensor, steps: int) -> tuple[dict[str, list[float]], float]:
    """{kernel or operator name: [time per step in us, launches per step]} and the wall time per
    step in us, over `steps` decode steps after a prefill of `prompt` (1, length)."""
    from moc_lightning.inference import DecodeStep

    cuda = prompt.device.type == "cuda"
    length = prompt.shape[1]
    cache = model.new_cache(1, cache_length(length, steps))
    positions = torch.arange(length, device=prompt.device)
    logits = model.forward_cached(prompt, cache, positions[None], positions)[:, -1]
    step = DecodeStep(model, cache, cuda_graph=cuda, compile=cuda, compile_mode="default")
    first = torch.full((1,), length, device=prompt.device)
    at = 0

    def run(n: int) -> None:
        nonlocal logits, at
        for _ in range(n):
            logits = step(logits.argmax(-1), first + at, length + at)
            at += 1

    run(WARM_STEPS)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        run(steps)
        if cuda:
            torch.cuda.synchronize()
    per_step: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    wanted = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for event in prof.events():
        # kernels (GPU) or top-level operators (CPU: their children would count twice)
        if event.device_type != wanted or (not cuda and event.cpu_parent is not None):
            continue
        spent = event.device_time_total if cuda else event.self_cpu_time_total
        per_step[event.name][0] += spent / steps
        per_step[event.name][1] += 1 / steps
    t0 = time.perf_counter()  # the profiled steps have finished (synchronized above)
    run(steps)
    if cuda:
        torch.cuda.synchronize()
    return dict(per_step), (time.perf_counter() - t0) / steps * 1e6


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-1b", help="a model preset (moc_lightning.models.presets)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before the profiled steps")
    parser.add_argument("--steps", type=int, default=10, help="decode steps profiled (and then timed)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per kind, the largest first")
    parser.add_argument("--attention", choices=("kernel", "sdpa"), default="kernel",
                        help="the steps' attention: the split-cache kernel (what prepare_for_decode sets) or SDPA")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    from moc_lightning.models import ModelConfig, MoCTransformer
    from moc_lightning.models.presets import PRESETS

    if args.model not in PRESETS:
        raise SystemExit(f"--model must be one of {', '.join(sorted(PRESETS))}, got {args.model!r}")
    if args.prompt < 1 or args.steps < 1 or args.top < 1:
        raise SystemExit("--prompt, --steps and --top must be at least 1")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    out = Recorder(BENCH, args.out)
    torch.manual_seed(0)
    for kind, group in KINDS:
        ffn = {"kind": kind, "topk_backend": "torch", **({"group": group} if group else {})}
        cfg = ModelConfig.from_preset(args.model, ffn=ffn, max_seq_len=cache_length(args.prompt, args.steps))
        with torch.device(device):
            model = MoCTransformer(cfg).to(dtype).eval()
        model.prepare_for_decode()  # MoC's FFN kernel; the attention kernel for every kind
        for layer in model.layers:
            layer.self_attn.decode_kernel = args.attention == "kernel"
        label = kind if group is None else f"{kind}_{group}"
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=device)
        with torch.no_grad():
            per_step, wall_us = profile_step(model, prompt, args.steps)
        ctx = dict(kind=label, attention=args.attention, model=args.model, prompt=args.prompt, steps=args.steps, dtype=str(dtype).split(".")[-1],
                   timed="kernels" if cuda else "cpu operators")
        out.emit(f"{label}/wall_per_step", wall_us, "us", **ctx)
        out.emit(f"{label}/sum_per_step", sum(us for us, _ in per_step.values()), "us",
                 launches=round(sum(n for _, n in per_step.values()), 2), **ctx)
        for name, (us, n) in sorted(per_step.items(), key=lambda item: -item[1][0])[:args.top]:
            out.emit(f"{label}/kernel", us, "us", kernel=name[:160], launches=round(n, 2), **ctx)
        del model
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
