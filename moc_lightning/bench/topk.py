"""Top-K backends side by side: torch.topk, the Triton kernels and RAFT's select_k.

    python3 -m moc_lightning.bench.topk [--rows 32768 --width 2736 --k 512 --group 2:8]
                                        [--no-raft] [--tune] [--out FILE]

First checks every backend against torch.topk on fresh random inputs of several shapes (widths
that are no multiple of the kernels' block, K = 1 and K = width, ties, a ragged last group), then
times each one on the (rows x width) bf16 gate, with the HBM floor of the bytes that must move
(the scores read, the indices or bitmask written) and the speed-up over torch.topk. RAFT is built
in a background thread while the rest runs (a few minutes the first time, then cached).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Callable, Optional

import torch

from moc_lightning.bench.common import Recorder, floor_ms, time_ms
from moc_lightning.ffn.compact import index_dtype
from moc_lightning.ffn.topk import _torch_group_topk, _torch_row_topk
from moc_lightning.kernels import raft_select_k, topk_triton

BENCH = "topk"
# (rows, width, k) of the row checks: widths off the power-of-two blocks, k at both ends.
# 2736 and 1000 take the bf16 word kernel's 16-byte loads, 2740 its unaligned path, 5461 (odd) the float kernel.
ROW_CHECKS = [(4096, 2736, 512), (1000, 1000, 100), (1000, 2740, 512), (513, 5461, 1024), (300, 37, 37),
              (257, 2736, 1), (64, 70000, 9)]
# (rows, width, a, b) of the group checks: exact, ragged and non-power-of-two groups, many picks.
GROUP_CHECKS = [(2048, 2736, 2, 8), (1000, 2740, 2, 8), (500, 1003, 3, 7), (300, 1000, 12, 16)]


def row_is_topk(scores: torch.Tensor, idx: torch.Tensor, k: int) -> bool:
    """k distinct in-range indices whose values are exactly torch.topk's (ties may pick any)."""
    if idx.shape != (scores.shape[0], k) or idx.dtype not in topk_triton.INDEX_DTYPES:
        return False
    idx = idx.long()
    if int(idx.min()) < 0 or int(idx.max()) >= scores.shape[1]:
        return False
    if k > 1 and not bool((idx.sort(dim=1).values.diff(dim=1) != 0).all()):
        return False
    got = scores.gather(1, idx).sort(dim=1).values
    return torch.equal(got, torch.topk(scores, k, dim=1).values.sort(dim=1).values)


def group_is_topk(scores: torch.Tensor, idx: torch.Tensor, a: int, b: int) -> bool:
    """Per group, the picks are that group's columns and their values are torch's picks' values."""
    ref = _torch_group_topk(scores, a, b)
    if idx.shape != ref.shape or idx.dtype != torch.int64:
        return False
    rows, width = scores.shape
    full, rest = divmod(width, b)
    slot_group = torch.cat([torch.arange(full, device=idx.device).repeat_interleave(a),
                            torch.full((ref.shape[1] - full * a,), full, device=idx.device)])
    if not bool((idx // b == slot_group).all()):
        return False
    got, want = scores.gather(1, idx), scores.gather(1, ref)
    parts = [(got[:, : full * a].reshape(rows, full, a), want[:, : full * a].reshape(rows, full, a))]
    if rest:
        parts.append((got[:, full * a:], want[:, full * a:]))
    return all(torch.equal(g.sort(dim=-1).values, w.sort(dim=-1).values) for g, w in parts)


def mask_is_topk(scores: torch.Tensor, mask: torch.Tensor, k: int) -> bool:
    """A bitmask of k channels a row whose values are exactly torch.topk's."""
    rows, width = scores.shape
    if mask.dtype != torch.uint8 or mask.shape != (rows, topk_triton.mask_bytes(width)):
        return False
    kept = topk_triton.mask_to_dense(mask, width)
    if not bool((kept.sum(dim=1) == k).all()) or int(topk_triton.mask_bits(mask)[:, width:].sum()):
        return False
    idx = kept.nonzero()[:, 1].view(rows, k)
    return row_is_topk(scores, idx, k)


def random_scores(rows: int, width: int, dtype: torch.dtype, ties: bool) -> torch.Tensor:
    if ties:
        return torch.randint(-4, 4, (rows, width), device="cuda").to(dtype)
    return torch.randn(rows, width, device="cuda").to(dtype)


def run_checks(rec: Recorder, backends: dict[str, tuple[Callable, Callable]]) -> bool:
    ok = True
    for name, (row_fn, group_fn) in backends.items():
        for dtype in (torch.bfloat16, torch.float32):
            for ties in (False, True):
                for rows, width, k in ROW_CHECKS:
                    scores = random_scores(rows, width, dtype, ties)
                    ok &= rec.check("row_matches_torch", row_is_topk(scores, row_fn(scores, k), k), backend=name,
                                    rows=rows, width=width, k=k, dtype=str(dtype), ties=ties)
                for rows, width, a, b in GROUP_CHECKS:
                    scores = random_scores(rows, width, dtype, ties)
                    ok &= rec.check("group_matches_torch", group_is_topk(scores, group_fn(scores, a, b), a, b),
                                    backend=name, rows=rows, width=width, group=f"{a}:{b}", dtype=str(dtype), ties=ties)
    return ok


def run_mask_checks(rec: Recorder) -> bool:
    """The row Top-K written as a bitmask (what MoC's training kernels read), on the row checks."""
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        for ties in (False, True):
            for rows, width, k in ROW_CHECKS:
                scores = random_scores(rows, width, dtype, ties)
                ok &= rec.check("row_mask_matches_torch", mask_is_topk(scores, topk_triton.row_topk_mask(scores, k), k),
                                backend="triton_mask", rows=rows, width=width, k=k, dtype=str(dtype), ties=ties)
    return ok


def time_backends(rec: Recorder, backends: dict[str, tuple[Callable, Callable]], args) -> dict[str, float]:
    rows, width, k = args.rows, args.width, args.k
    a, b = (int(v) for v in args.group.split(":"))
    scores = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    full, rest = divmod(width, b)
    kept_group = full * a + min(a, rest)
    read = scores.numel() * scores.element_size()
    shape = dict(rows=rows, width=width, dtype="bfloat16")
    rec.emit("row_floor_ms", floor_ms(read + rows * k * 8), "ms", k=k, read_only_floor_ms=floor_ms(read), **shape)
    rec.emit("group_floor_ms", floor_ms(read + rows * kept_group * 8), "ms", group=args.group, **shape)
    times: dict[str, float] = {}
    for name, (row_fn, group_fn) in backends.items():
        for kind, fn, ctx in (("row", lambda: row_fn(scores, k), {"k": k}),
                              ("group", lambda: group_fn(scores, a, b), {"group": args.group})):
            out = fn()
            floor = floor_ms(read + out.numel() * out.element_size())  # the indices as this backend writes them
            ms = time_ms(fn)
            times[f"{kind}/{name}"] = ms
            rec.emit(f"{kind}_ms", ms, "ms", backend=name, floor_ms=floor, x_floor=ms / floor,
                     index_dtype=str(out.dtype), **ctx, **shape)
    for kind in ("row", "group"):
        base = times.get(f"{kind}/torch")
        for key, ms in times.items():
            if key.startswith(kind + "/") and base and not key.endswith("/torch"):
                rec.emit(f"{kind}_speedup_vs_torch", base / ms, "x", backend=key.split("/", 1)[1], **shape)
    return times


ROW_SETTINGS = ([dict(packed=True, num_warps=2, chunk=c) for c in (128, 256)]
                + [dict(packed=True, num_warps=1, chunk=c, maxnreg=r) for c in (64, 128, 256, 512)
                   for r in (64, 80, 96, 128, 255)]
                + [dict(segs_per_program=s, num_warps=w, split=True, int_count=ic) for ic in (False, True)
                   for s, w in ((1, 1), (1, 2), (1, 4), (2, 2))]
                + [dict(segs_per_program=1, num_warps=w, split=False) for w in (1, 2, 4)])
GROUP_SETTINGS = [dict(groups_per_program=g, num_warps=w) for g, w in ((32, 1), (64, 1), (64, 2), (128, 2), (128, 4))]


def tune(rec: Recorder, args) -> tuple[dict, dict]:
    """Time the Triton kernels' launch settings on the benchmark shape (one record each); the
    fastest row and group settings."""
    a, b = (int(v) for v in args.group.split(":"))
    scores = torch.randn(args.rows, args.width, device="cuda", dtype=torch.bfloat16)
    shape = dict(rows=args.rows, width=args.width, dtype="bfloat16")
    best: dict[str, tuple[float, dict]] = {}
    for kind, settings, run in (
            ("row", ROW_SETTINGS, lambda kw: topk_triton.row_topk(scores, args.k, **kw)),
            ("group", GROUP_SETTINGS, lambda kw: topk_triton.group_topk(scores, a, b, **kw))):
        for kw in settings:
            ms = time_ms(lambda: run(kw))
            rec.emit(f"tune_{kind}_ms", ms, "ms", **kw, **shape)
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, kw)
    return best["row"][1], best["group"][1]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--width", type=int, default=2736)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--group", default="2:8")
    parser.add_argument("--no-raft", action="store_true", help="skip RAFT (no build)")
    parser.add_argument("--raft-wait", type=float, default=420.0, help="seconds to wait for RAFT's build")
    parser.add_argument("--tune", action="store_true", help="also time the Triton kernels' launch settings")
    parser.add_argument("--out", help="append every record to this file too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moc_lightning.bench.topk needs a CUDA GPU")
    rec = Recorder(BENCH, args.out)
    device = torch.device("cuda")

    raft_state: dict = {}
    builder = None
    if not args.no_raft:
        reason = raft_select_k.unavailable_reason(device)
        if reason is not None:
            rec.emit("raft_built", 0.0, "bool", reason=reason)
        else:
            def build():
                start = time.perf_counter()
                try:
                    raft_state["path"] = str(raft_select_k.build(device))
                except Exception as exc:  # reported below as a record, the other backends still run
                    raft_state["error"] = f"{exc}"
                raft_state["seconds"] = time.perf_counter() - start

            builder = threading.Thread(target=build, daemon=True)
            builder.start()

    # `triton` takes two bf16 keys per word where it can; `triton_float_keys` is its float32
    # kernel on the same rows, timed beside it to show what the packed compares gain.
    # `triton_int16` writes the indices as MoC saves them (int16 up to 32768 channels; torch.topk
    # can only write int64), `triton_int32` the third index type the kernels store.
    backends = {"triton": (topk_triton.row_topk, topk_triton.group_topk),
                "triton_int16": (lambda s, k: topk_triton.row_topk(s, k, out_dtype=index_dtype(s.shape[1])),
                                 topk_triton.group_topk),
                "triton_int32": (lambda s, k: topk_triton.row_topk(s, k, out_dtype=torch.int32),
                                 topk_triton.group_topk),
                "triton_float_keys": (lambda s, k: topk_triton.row_topk(s, k, packed=False), topk_triton.group_topk)}
    all_ok = run_checks(rec, backends) & run_mask_checks(rec)
    # `triton_mask` writes the row Top-K as a bitmask of the kept channels (uint8, 4 bytes per 32
    # channels), as MoC's training path takes it.
    timed = {"torch": (_torch_row_topk, _torch_group_topk), **backends,
             "triton_mask": (topk_triton.row_topk_mask, topk_triton.group_topk)}
    if args.tune:
        row_kw, group_kw = tune(rec, args)
        if row_kw.get("packed"):  # the tuned settings are checked on float32 rows too
            row_kw = {**row_kw, "packed": None}
        timed["triton_tuned"] = (lambda s, k: topk_triton.row_topk(s, k, **row_kw),
                                 lambda s, a, b: topk_triton.group_topk(s, a, b, **group_kw))
        all_ok &= run_checks(rec, {"triton_tuned": timed["triton_tuned"]})
        rec.emit("tuned_settings", 1.0, "info", row=row_kw, group=group_kw)
    time_backends(rec, timed, args)

    if builder is not None:
        builder.join(timeout=args.raft_wait)
        if builder.is_alive():
            rec.emit("raft_built", 0.0, "bool", reason=f"still building after {args.raft_wait:.0f} s")
        elif "error" in raft_state:
            rec.emit("raft_built", 0.0, "bool", seconds=raft_state["seconds"], reason=raft_state["error"])
        else:
            rec.emit("raft_built", 1.0, "bool", seconds=raft_state["seconds"], library=raft_state["path"])
            raft = {"raft": (raft_select_k.row_topk, raft_select_k.group_topk)}
            all_ok &= run_checks(rec, raft)
            time_backends(rec, {"torch": timed["torch"], **raft}, args)
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
