"""Where the time goes inside the MoC decode up/down launch: GPU timestamps at its phase boundaries.

    python -m moc_lightning.bench.decode_phases [--calls 30] [--config '{"updown_rows": 8}'] [--out F]

A graphed launch timed alone hides how its programs spend their time (the launch and the drain
are in it; its phases overlap). This builds a copy of `moc_lightning.kernels.moc_decode` whose
up/down kernel reads the SM's %globaltimer at each phase boundary and stores it per program:

    start      the program runs (past its wait on the previous launch)
    top        row Top-K: the threshold's top byte, off the coarse histogram
    threshold  row Top-K: T, off the fine histogram
    cut        row Top-K: the ties at T ranked (the selection is known)
    rows_done  its kept rows read and multiplied (the partial is in registers)
    slots      one token: a round's kept rows picked for its slots (the last round's)

For batch 1 at the 1B shapes (row Top-K and MoC_2:8, the default launch configs, or a change to
them), it prints each stamp's minimum, median and maximum over the programs, in microseconds
after the first program's start (the median of these over --calls fresh inputs), as JSON lines.
Writing a copy keeps the timers out of the kernels everyone runs; the anchors it instruments are
checked, so a change to the kernel that moves them fails here loudly, not silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import sys
import tempfile
from types import ModuleType
from typing import Optional

import torch

from moc_lightning.bench.common import Recorder

BENCH = "decode_phases"
STAMPS = ("start", "top", "threshold", "cut", "rows_done", "slots")  # by slot

_STAMP_FN = '''
def _stamp(ptr, slot, dep, ON: tl.constexpr):
    """The %globaltimer (ns) into ptr[program, slot], read once dep is computed."""
    if ON:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [dep.to(tl.int32)],
                                      dtype=tl.int64, is_pure=False, pack=1)
        tl.store(ptr + tl.program_id(0) * 8 + slot, t)


# --- device functions'''

# (anchor in the kernel module's source, what replaces it); each anchor must occur exactly once.
_EDITS = (
    ("\n# --- device functions", _STAMP_FN),
    ("_kernel = ModeJit(globals(), (_after_previous,", "_kernel = ModeJit(globals(), (_stamp, _after_previous,"),
    ("def _row_threshold(g_row_ptr,", "def _row_threshold(STAMP_PTR, STAMP_ON: tl.constexpr, g_row_ptr,"),
    ("    top = (packed >> 20) - 1\n", "    top = (packed >> 20) - 1\n    _stamp(STAMP_PTR, 1, top, STAMP_ON)\n"),
    ("        cut = F\n        if ((packed >> 20) & 0xFFFFF) == (packed >> 40):",
     "        cut = F\n        _stamp(STAMP_PTR, 2, thr, STAMP_ON)\n"
     "        if ((packed >> 20) & 0xFFFFF) == (packed >> 40):"),
    ("    thr, cut = _row_threshold(g_ptr + t * F,", "    thr, cut = _row_threshold(thr_ptr, False, g_ptr + t * F,"),
    ("thr_ptr, cut_ptr, wu_ptr, wdt_ptr, part_ptr,\n                   hint_ptr, D,",
     "thr_ptr, cut_ptr, wu_ptr, wdt_ptr, part_ptr,\n                   hint_ptr, stamp_ptr, D,"),
    ("    _after_previous(PDL)\n    lane = tl.arange(0, BLOCK_C)\n",
     "    _after_previous(PDL)\n    _stamp(stamp_ptr, 0, tl.program_id(0), True)\n    lane = tl.arange(0, BLOCK_C)\n"),
    ("_row_threshold(g_ptr, keys_ptr, hist,", "_row_threshold(stamp_ptr, True, g_ptr, keys_ptr, hist,"),
    ("            cut = tl.zeros((T,), dtype=tl.int32) + cut_1\n",
     "            cut = tl.zeros((T,), dtype=tl.int32) + cut_1\n"
     "            _stamp(stamp_ptr, 3, (thr_1 + cut_1).to(tl.int32), True)\n"),
    ("    if SINGLE and (ACC_REGS or not BY_TOKEN):\n        cols = tl.arange(0, BLOCK_D)\n        tl.store(part",
     "    _stamp(stamp_ptr, 4, tl.sum(tl.sum(acc, axis=1), axis=0).to(tl.int32, bitcast=True), True)\n"
     "    if SINGLE and (ACC_REGS or not BY_TOKEN):\n        cols = tl.arange(0, BLOCK_D)\n        tl.store(part"),
    ("            rows, g_r, held = _top_slots(needed & (place >= first), ch, g, R)\n",
     "            rows, g_r, held = _top_slots(needed & (place >= first), ch, g, R)\n"
     "            _stamp(stamp_ptr, 5, tl.sum(rows, axis=0), True)\n"),
    ("s.thr if hint is None else hint,\n        d_model,", "s.thr if hint is None else hint,\n        STAMPS, d_model,"),
    ("_SHARED: dict[tuple, DecodeScratch] = {}", "_SHARED: dict[tuple, DecodeScratch] = {}\nSTAMPS = None"),
)


def instrumented_source() -> str:
    """moc_decode's source with the timestamps; raises if an anchor is missing or repeated."""
    from moc_lightning.kernels import moc_decode

    src = inspect.getsource(moc_decode)
    for anchor, replacement in _EDITS:
        found = src.count(anchor)
        if found != 1:
            raise RuntimeError(f"moc_decode changed: the phase anchor {anchor.strip()[:60]!r} occurs {found} times, "
                               "not once; update moc_lightning/bench/decode_phases.py")
        src = src.replace(anchor, replacement)
    return src


def load_instrumented() -> ModuleType:
    """The instrumented copy as a module (written to a temporary file: triton reads kernel source)."""
    path = os.path.join(tempfile.mkdtemp(prefix="moc_phases_"), "moc_decode_phases.py")
    with open(path, "w") as f:
        f.write(instrumented_source())
    spec = importlib.util.spec_from_file_location("moc_decode_phases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def phase_times(stamps: torch.Tensor) -> dict[str, list[float]]:
    """(programs, 8) int64 ns stamps (0: not reached) -> stamp name: [min, median, max] over the
    programs, in us after the earliest start."""
    s = stamps[stamps[:, 0] > 0].double()
    t0 = s[:, 0].min()
    out = {}
    for slot, name in enumerate(STAMPS):
        col = s[:, slot]
        col = col[col > 0]
        if col.numel():
            us = (col - t0) / 1e3
            out[name] = [float(us.min()), float(us.median()), float(us.max())]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="fresh inputs timed (the median is reported)")
    parser.add_argument("--config", default="{}", help="changes to the batch-1 launch configs, as JSON")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    try:
        change = json.loads(args.config)
        from moc_lightning.kernels.moc_decode import LaunchConfig

        LaunchConfig(**change)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"--config must be a JSON object of LaunchConfig fields: {exc}")
    if not torch.cuda.is_available():
        raise SystemExit("moc_lightning.bench.decode_phases needs a CUDA GPU")
    from moc_lightning.bench.decode import D, D_FFN, GROUP, K, Layer, fresh_inputs, graphed_ms

    md = load_instrumented()
    out = Recorder(BENCH, args.out)
    torch.manual_seed(0)
    layer = Layer(torch.bfloat16)
    wg, wu = layer.weights[0], layer.weights[1]
    wdt = layer.moc.decode_layout.w_down_t
    scratch = md.DecodeScratch(D, D_FFN, torch.device("cuda"))
    md.STAMPS = torch.zeros(scratch.max_programs, 8, dtype=torch.int64, device="cuda")
    for kind, group in (("moc", None), ("moc_2:8", GROUP)):
        try:  # a change may not fit both kinds' configs (more channels than a:b's 16-lane blocks)
            cfg = dataclasses.replace(md.launch_config(1, grouped=group is not None), **change)
        except ValueError as exc:
            print(f"{kind}: skipped, {exc}", file=sys.stderr)
            continue
        x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)

        def step(x=x):
            return md.moc_decode(x, wg, wu, wdt, k=K, group=group, scratch=scratch, config=cfg)

        nxt = fresh_inputs(1, torch.bfloat16)
        step_us = graphed_ms(lambda: step(nxt())) * 1e3
        runs = []
        for _ in range(args.calls):
            x.copy_(torch.randn(1, D, device="cuda", dtype=torch.bfloat16))
            md.STAMPS.zero_()
            step()
            torch.cuda.synchronize()
            runs.append(phase_times(md.STAMPS.cpu()))
        for name in STAMPS:
            if name in runs[0]:
                mid = torch.tensor([r[name] for r in runs]).median(dim=0).values.tolist()
                out.emit(f"{kind}/{name}", mid[1], "us", min_us=mid[0], max_us=mid[2], batch=1,
                         config=change, step_us=step_us)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
