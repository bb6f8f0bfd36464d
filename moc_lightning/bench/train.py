"""MoC in training on a GPU: correctness of the Triton path, FFN forward+backward time and saved
bytes against dense SwiGLU and the baselines, whole training steps, and the largest batch that fits.

    python3 -m moc_lightning.bench.train [--only check,ffn,step,maxbatch] [--extra profile,micro]

Parts (JSON lines through moc_lightning.bench.common, bench "train"):
  check     Triton path vs torch path vs a float64 reference, on fresh random inputs of several shapes
  elementwise  MoC's element-wise kernels alone at 350M shapes, each launch setting: the scatter
            kernels, the Top-K writing indices or a bitmask, the mask forward and backward
            (their outputs compared bit for bit with the scatter kernels'), and the 2:8 group
            forward and backward
  ffn       FFN fwd+bwd at 350M shapes (32768 tokens, d 1024, d_ffn 2736, K 512), bf16
  step      llama-350m, bsz 128 x 256 tokens: forward + backward + AdamW (bf16 autocast, fp32 weights)
  maxbatch  llama-1b: the largest batch of 256-token sequences whose training step fits, dense vs MoC
  profile   (extra) kernel-time table of MoC's fwd+bwd, to stderr
  micro     (extra) GEMM layout choices and 2:4 semi-structured sparse GEMMs at the FFN's shapes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from moc_lightning.bench.common import check, copy_bandwidth_gbs, emit, floor_ms, rel_error, time_ms
from moc_lightning.ffn import FFNConfig, build_ffn, functions, topk
from moc_lightning.ffn.compact import index_dtype
from moc_lightning.kernels import moc_train, topk_triton
from moc_lightning.profiling import measure_saved_bytes

BENCH = "train"
SHAPE_350M = {"d_model": 1024, "d_ffn": 2736}
TOKENS = 32768
DTYPE = torch.bfloat16


def topk_backends() -> list[str]:
    """The registered Top-K backends that run on this GPU (the others are reported, not timed)."""
    usable = []
    for name, (runs_on, _, _) in topk._BACKENDS.items():
        if runs_on(torch.device("cuda")):
            usable.append(name)
        else:
            why = topk._WHY_NOT[name](torch.device("cuda")) if name in getattr(topk, "_WHY_NOT", {}) else None
            emit(BENCH, "topk_backend_skipped", 0.0, "skipped", backend=name, reason=why or "does not run on cuda")
    return usable


def fresh(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=DTYPE) * scale


def build(cfg: FFNConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_ffn(cfg).to(device="cuda", dtype=DTYPE)


def fwd_bwd(module, x, grad_out) -> Callable[[], tuple]:
    params = list(module.parameters()) if hasattr(module, "parameters") else []

    def run():
        out = module(x)
        return torch.autograd.grad(out, [x, *params], grad_out)

    return run


# --- (a) correctness -------------------------------------------------------------------------------


def _reference(x, weights, grad_out, mask):
    """Output and gradients of the masked SwiGLU FFN in float64 (mask held constant)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, *weights)]
    xd, wg, wu, wd = leaves
    g = xd @ wg.T
    out = (F.silu(g) * mask * (xd @ wu.T)) @ wd.T
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


def _run_capturing_mask(module, x, grad_out, d_ffn):
    """Output, the four gradients, the 0/1 kept-channel mask (float64) from what the module saved
    for backward (indices, or a bitmask), and the bytes that bitmask took over the indices the
    torch path saves (int16 below 32768 channels)."""
    kept = []

    def pack(t):
        if t.dtype in (torch.int16, torch.int32, torch.uint8):
            kept.append(t)
        return t

    xg = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(xg)
    grads = torch.autograd.grad(out, [xg, *module.parameters()], grad_out)
    rows = x.shape[0]
    if kept[0].dtype == torch.uint8:
        mask = topk_triton.mask_to_dense(kept[0], d_ffn).double()
        extra = kept[0].numel() - index_dtype(d_ffn).itemsize * rows * int(mask[0].sum())
    else:
        mask = torch.zeros(rows, d_ffn, device=x.device, dtype=torch.float64).scatter_(1, kept[0].long(), 1.0)
        extra = 0
    return out.detach(), grads, mask, extra


CHECK_CASES = [
    {"rows": 4096, "d_model": 1024, "d_ffn": 2736, "k": 512},
    {"rows": 4096, "d_model": 1024, "d_ffn": 2736, "group": "2:8"},
    {"rows": 1000, "d_model": 256, "d_ffn": 700, "k": 100, "placement": "post_silu", "recompute": False},
    {"rows": 1000, "d_model": 256, "d_ffn": 700, "group": "3:8", "placement": "post_silu"},
    {"rows": 2048, "d_model": 512, "d_ffn": 1376, "group": "2:8", "topk_backend": "torch", "recompute": False},
]


def check_correctness() -> bool:
    all_ok = True
    for case in CHECK_CASES:
        case = dict(case)
        rows = case.pop("rows")
        label = f"{FFNConfig(kind='moc', **case).label}_{case['d_ffn']}x{rows}"
        cfg = FFNConfig(kind="moc", **case)
        x, grad_out = fresh(rows, cfg.d_model), fresh(rows, cfg.d_model)
        results, saved, mask_extra = {}, {}, {}
        for kernel in ("torch", "triton"):
            module = build(cfg.replace(moc_kernel=kernel))
            out, grads, mask, mask_extra[kernel] = _run_capturing_mask(module, x, grad_out, cfg.d_ffn)
            weights = [p.detach() for p in module.parameters()]
            ref_out, ref_grads = _reference(x, weights, grad_out, mask)
            results[kernel] = (out, grads, mask, ref_out, ref_grads)
            saved[kernel] = measure_saved_bytes(module, x.detach().clone().requires_grad_(True)).total
        mask_t, mask_r = results["triton"][2], results["torch"][2]
        counts_ok = bool((mask_t.sum(1) == cfg.kept_channels).all())
        agree = float((mask_t * mask_r).sum() / mask_r.sum())
        emit(BENCH, "check_mask_agreement", agree, "fraction", case=label)
        # The same tensors saved, but for a bitmask in place of int16 indices.
        ok = counts_ok and saved["torch"] + mask_extra["triton"] == saved["triton"]
        names = ("out", "grad_x", "grad_gate", "grad_up", "grad_down")
        for i, name in enumerate(names):
            pick = (lambda r: r[0] if i == 0 else r[1][i - 1])
            ref = (lambda r: r[3] if i == 0 else r[4][i - 1])
            err_triton = rel_error(pick(results["triton"]), ref(results["triton"]))
            err_torch = rel_error(pick(results["torch"]), ref(results["torch"]))
            err_between = rel_error(pick(results["triton"]), pick(results["torch"]))
            emit(BENCH, "check_rel_error", err_triton, "rel", case=label, tensor=name, vs="float64 reference (own mask)",
                 torch_path_error=err_torch, triton_vs_torch=err_between)
            ok &= err_triton <= 1.5 * err_torch + 2e-3
        all_ok &= check(BENCH, "triton_path_matches", ok, case=label, kept_per_row_ok=counts_ok,
                        saved_bytes_torch=saved["torch"], saved_bytes_triton=saved["triton"])
        del results
        torch.cuda.empty_cache()
    return all_ok


def _settings(configs) -> list[tuple[dict, int]]:
    return [(dict(c.kwargs), c.num_warps) for c in configs]


def bench_elementwise() -> bool:
    """MoC's element-wise kernels alone at 350M shapes, on the triton row Top-K's channels: the
    scatter forward and backward (any index order) at each launch setting, and the bitmask path
    (the Top-K writing a mask, the mask forward and backward, whose outputs must equal the
    scatter kernels' bit for bit) at each of its settings."""
    rows, d_ffn, k = TOKENS, SHAPE_350M["d_ffn"], 512
    gate_up = fresh(rows, 2 * d_ffn)
    g, u = gate_up[:, :d_ffn], gate_up[:, d_ffn:]
    idx = topk.select_channels(g, k=k, backend="triton", index_dtype=torch.int16)
    grad_z = fresh(rows, d_ffn)
    ref = moc_train.scatter_forward(g, u, idx, torch.int16, False)
    ref_buf = moc_train.scatter_backward(grad_z, ref.idx, ref.g_sel, ref.u_sel)
    emit(BENCH, "elementwise_ms", time_ms(lambda: moc_train.scatter_forward(g, u, idx, torch.int16, False)), "ms",
         kernel="scatter_forward", setting="autotuned")
    emit(BENCH, "elementwise_ms", time_ms(lambda: moc_train.scatter_backward(grad_z, ref.idx, ref.g_sel, ref.u_sel)),
         "ms", kernel="scatter_backward", setting="autotuned")
    grid = lambda meta: (-(-rows // meta["BLOCK_R"]),)  # noqa: E731
    dummy = ref.g_sel.new_empty(1)
    z_dense = torch.empty(rows, d_ffn, dtype=DTYPE, device="cuda")
    compact = [torch.empty(rows, k, dtype=t, device="cuda") for t in (torch.int16, DTYPE, DTYPE)]
    buf = torch.empty(rows, 3 * d_ffn, dtype=DTYPE, device="cuda")
    all_ok = True
    for meta, warps in _settings(moc_train._ELEMENTWISE_CONFIGS):
        fwd = lambda: moc_train._scatter_forward_kernel[grid(meta)](  # noqa: E731
            g, u, idx, z_dense, *compact, dummy, dummy, rows, d_ffn, k, g.stride(0), u.stride(0), idx.stride(0), d_ffn,
            k, STORE_SZ=False, WRITE_IX=False, ASM=moc_train._asm(g.device), num_warps=warps, **meta)
        bwd = lambda: moc_train._scatter_backward_kernel[grid(meta)](  # noqa: E731
            grad_z, ref.idx, ref.g_sel, ref.u_sel, dummy, dummy, buf, rows, d_ffn, k, d_ffn, k, 3 * d_ffn,
            STORED=False, ASM=moc_train._asm(g.device), num_warps=warps, **meta)
        emit(BENCH, "elementwise_ms", time_ms(fwd), "ms", kernel="scatter_forward", num_warps=warps, **meta)
        emit(BENCH, "elementwise_ms", time_ms(bwd), "ms", kernel="scatter_backward", num_warps=warps, **meta)
    # The bitmask path: the Top-K writing a mask, the mask forward and backward (bit for bit the
    # scatter kernels' results), autotuned and at each setting.
    mask = topk_triton.row_topk_mask(g, k)
    all_ok &= check(BENCH, "row_topk_mask_matches_indices", torch.equal(mask, topk_triton.mask_from_indices(idx, d_ffn)))
    emit(BENCH, "elementwise_ms", time_ms(lambda: topk.select_channels(g, k=k, backend="triton",
                                                                       index_dtype=torch.int16)),
         "ms", kernel="row_topk_int16")
    emit(BENCH, "elementwise_ms", time_ms(lambda: topk_triton.row_topk_mask(g, k)), "ms", kernel="row_topk_mask")
    for stored in (False, True):
        want = moc_train.scatter_forward(g, u, idx, torch.int16, stored)
        got = moc_train.mask_forward(g, u, mask, k, stored)
        same = all(torch.equal(a, b) for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]) if a is not None)
        all_ok &= check(BENCH, "mask_forward_matches_scatter", same, stored=stored)
        extra = (got.s_sel, got.z_sel) if stored else ()
        all_ok &= check(BENCH, "mask_backward_matches_scatter",
                        torch.equal(moc_train.mask_backward(grad_z, mask, got.g_sel, got.u_sel, *extra),
                                    moc_train.scatter_backward(grad_z, want.idx, want.g_sel, want.u_sel, *extra)),
                        stored=stored)
    emit(BENCH, "elementwise_ms", time_ms(lambda: moc_train.mask_forward(g, u, mask, k, False)), "ms",
         kernel="mask_forward", setting="autotuned")
    emit(BENCH, "elementwise_ms", time_ms(lambda: moc_train.mask_backward(grad_z, mask, ref.g_sel, ref.u_sel)), "ms",
         kernel="mask_backward", setting="autotuned")
    words = mask.view(torch.int32)
    for meta, warps in _settings(moc_train._MASK_CONFIGS):
        fwd = lambda: moc_train._mask_forward_kernel[grid(meta)](  # noqa: E731
            g, u, words, z_dense, *compact[1:], dummy, dummy, rows, d_ffn, words.shape[1], g.stride(0), u.stride(0),
            words.shape[1], d_ffn, k, STORE_SZ=False, ASM=moc_train._asm(g.device), num_warps=warps, **meta)
        bwd = lambda: moc_train._mask_backward_kernel[grid(meta)](  # noqa: E731
            grad_z, words, ref.g_sel, ref.u_sel, dummy, dummy, buf, rows, d_ffn, words.shape[1], d_ffn,
            words.shape[1], k, 3 * d_ffn, STORED=False, ASM=moc_train._asm(g.device), num_warps=warps, **meta)
        for out in (z_dense, *compact[1:], buf):
            out.fill_(float("nan"))
        fwd()
        bwd()
        same = all(torch.equal(a, b) for a, b in ((z_dense, ref.z_dense), (compact[1], ref.g_sel), (compact[2], ref.u_sel)))
        all_ok &= check(BENCH, "mask_forward_matches_scatter", same, num_warps=warps, **meta)
        all_ok &= check(BENCH, "mask_backward_matches_scatter", torch.equal(buf, ref_buf), num_warps=warps, **meta)
        emit(BENCH, "elementwise_ms", time_ms(fwd), "ms", kernel="mask_forward", num_warps=warps, **meta)
        emit(BENCH, "elementwise_ms", time_ms(bwd), "ms", kernel="mask_backward", num_warps=warps, **meta)
    fwd_bytes = 2 * rows * d_ffn * 3 + rows * k * 6
    bwd_bytes = 2 * rows * d_ffn * 4 + rows * k * 6
    emit(BENCH, "elementwise_byte_floor", floor_ms(fwd_bytes), "ms", kernel="forward (read G, U; write Z', compact)")
    emit(BENCH, "elementwise_byte_floor", floor_ms(bwd_bytes), "ms",
         kernel="backward (read grad_Z, compact; write [Z' | grad_G' | grad_U'])")
    return all_ok & _bench_group_kernels(g, u, grad_z, (2, 8))


def _bench_group_kernels(g, u, grad_z, group: tuple[int, int]) -> bool:
    """The a:b group forward and backward, autotuned and at each of their settings, every
    setting's outputs checked bit for bit against the autotuned launch's."""
    rows, d_ffn = g.shape
    a, b = group
    ref = moc_train.group_forward(g, u, group, False, torch.int16, False)
    ref_buf = moc_train.group_backward(grad_z, ref.idx, ref.g_sel, ref.u_sel, group)
    emit(BENCH, "elementwise_ms", time_ms(lambda: moc_train.group_forward(g, u, group, False, torch.int16, False)), "ms",
         kernel="group_forward", group=f"{a}:{b}", setting="autotuned")
    emit(BENCH, "elementwise_ms", time_ms(lambda: moc_train.group_backward(grad_z, ref.idx, ref.g_sel, ref.u_sel, group)),
         "ms", kernel="group_backward", group=f"{a}:{b}", setting="autotuned")
    n_groups, kept = -(-d_ffn // b), ref.idx.shape[1]
    grid = moc_train._group_grid(rows, n_groups)
    dummy = ref.g_sel.new_empty(1)
    z_dense = torch.empty_like(ref.z_dense)
    compact = [torch.empty_like(t) for t in (ref.idx, ref.g_sel, ref.u_sel)]
    buf = torch.empty_like(ref_buf)
    asm = moc_train._asm(g.device)
    all_ok = True
    for meta, warps in _settings(moc_train._GROUP_FORWARD_CONFIGS):
        fwd = lambda: moc_train._group_forward_kernel[grid(meta)](  # noqa: E731
            g, u, z_dense, *compact, dummy, dummy, rows, d_ffn, g.stride(0), u.stride(0), d_ffn, kept, A=a,
            A_P2=1 << (a - 1).bit_length(), B=b, POST_SILU=False, STORE_SZ=False, ASM=asm, num_warps=warps, **meta)
        for out in (z_dense, *compact[1:]):
            out.fill_(float("nan"))
        fwd()
        same = all(torch.equal(x, y) for x, y in zip((z_dense, *compact), (ref.z_dense, ref.idx, ref.g_sel, ref.u_sel)))
        all_ok &= check(BENCH, "group_forward_settings_agree", same, num_warps=warps, **meta)
        emit(BENCH, "elementwise_ms", time_ms(fwd), "ms", kernel="group_forward", group=f"{a}:{b}", num_warps=warps,
             **meta)
    for meta, warps in _settings(moc_train._GROUP_BACKWARD_CONFIGS):
        bwd = lambda: moc_train._group_backward_kernel[grid(meta)](  # noqa: E731
            grad_z, ref.idx, ref.g_sel, ref.u_sel, dummy, dummy, buf, rows, d_ffn, n_groups, kept, d_ffn, kept,
            3 * d_ffn, A=a, B=b, STORED=False, ASM=asm, num_warps=warps, **meta)
        buf.fill_(float("nan"))
        bwd()
        all_ok &= check(BENCH, "group_backward_settings_agree", torch.equal(buf, ref_buf), num_warps=warps, **meta)
        emit(BENCH, "elementwise_ms", time_ms(bwd), "ms", kernel="group_backward", group=f"{a}:{b}", num_warps=warps,
             **meta)
    compact_bytes = rows * kept * 6  # int16 index, G and U at the kept channels
    emit(BENCH, "elementwise_byte_floor", floor_ms(2 * rows * d_ffn * 3 + compact_bytes), "ms",
         kernel=f"group forward {a}:{b} (read G, U; write Z', compact)")
    emit(BENCH, "elementwise_byte_floor", floor_ms(2 * rows * d_ffn * 4 + compact_bytes), "ms",
         kernel=f"group backward {a}:{b} (read grad_Z, compact; write [Z' | grad_G' | grad_U'])")
    return all_ok


# --- (b) FFN forward + backward ---------------------------------------------------------------------


@contextlib.contextmanager
def kernel_path(path: str):
    """MoC's Triton path for the triton row Top-K, for side-by-side timing: `default` (the Top-K
    writes a bitmask, then the mask forward and backward) or `indices` (the Top-K writes int16
    indices, then the gather forward and the scatter backward, as for any backend's indices)."""
    native = functions.row_mask_native
    if path == "indices":
        functions.row_mask_native = lambda backend, device: False
    try:
        yield
    finally:
        functions.row_mask_native = native


def ffn_variants() -> list[tuple[str, FFNConfig, dict]]:
    dense = FFNConfig(kind="swiglu", **SHAPE_350M)
    moc = FFNConfig(kind="moc", **SHAPE_350M)
    variants = [
        ("swiglu", dense, {}),
        ("swiglu_compiled", dense, {"compile": True}),
        ("swiglu+gcp", dense.replace(checkpoint=True), {}),
        ("moc_k512_torch_kernel", moc.replace(moc_kernel="torch"), {}),
    ]
    for backend in topk_backends():
        variants.append((f"moc_k512_triton_topk_{backend}", moc.replace(moc_kernel="triton", topk_backend=backend), {}))
    # The triton row Top-K through the indices path, side by side with the default (bitmask) one.
    variants.append(("moc_k512_triton_topk_triton_indices", moc.replace(moc_kernel="triton", topk_backend="triton"),
                     {"path": "indices"}))
    variants += [
        ("moc_k512_stored_triton", moc.replace(moc_kernel="triton", recompute=False), {}),
        ("moc_2:8_torch_kernel", moc.replace(group="2:8", moc_kernel="torch"), {}),
        ("moc_2:8_triton", moc.replace(group="2:8", moc_kernel="triton"), {}),
        ("moc_k512+gcp_triton", moc.replace(moc_kernel="triton", checkpoint=True), {}),
        ("backrazor_0.2", FFNConfig(kind="backrazor", **SHAPE_350M), {}),
    ]
    return variants


def gemm_ms(x, w_gate, w_up, w_down, grad_out) -> float:
    """The nine GEMMs of an FFN forward+backward at these shapes, back to back, as MoC's Triton
    path issues them (what no element-wise fusion can remove)."""
    rows, d_ffn = x.shape[0], w_gate.shape[0]
    z = torch.randn(rows, d_ffn, device="cuda", dtype=DTYPE)
    buf = torch.randn(rows, 3 * d_ffn, device="cuda", dtype=DTYPE)
    w_gate_up = torch.cat((w_gate, w_up))

    def run():
        F.linear(x, w_gate), F.linear(x, w_up), F.linear(z, w_down)
        grad_out @ w_down, grad_out.t() @ buf[:, :d_ffn]
        buf[:, d_ffn:].t() @ x, buf[:, d_ffn:] @ w_gate_up

    return time_ms(run)


def bench_ffn() -> None:
    rows, d_model, d_ffn = TOKENS, SHAPE_350M["d_model"], SHAPE_350M["d_ffn"]
    x = fresh(rows, d_model).requires_grad_(True)
    grad_out = fresh(rows, d_model)
    flops = 18 * rows * d_model * d_ffn
    ref = build(FFNConfig(kind="swiglu", **SHAPE_350M))
    gemms = gemm_ms(x.detach(), *[p.detach() for p in ref.parameters()], grad_out)
    emit(BENCH, "ffn_gemm_floor", gemms, "ms", what="the 9 GEMMs of fwd+bwd, cuBLAS, back to back",
         tflops=flops / gemms / 1e9, tokens=rows, **SHAPE_350M)
    # Bytes MoC's element-wise work must move at least (Top-K reads G; forward reads G, U and writes Z';
    # backward reads grad_Z and writes [Z' | grad_G' | grad_U']), at the measured copy bandwidth.
    elementwise_bytes = 2 * rows * d_ffn * (1 + 2 + 1 + 1 + 3)
    emit(BENCH, "ffn_moc_elementwise_byte_floor", floor_ms(elementwise_bytes), "ms", bytes=elementwise_bytes,
         copy_gbs=copy_bandwidth_gbs())
    times, saved = {}, {}
    for label, cfg, opts in ffn_variants():
        module = build(cfg)
        runner = torch.compile(module) if opts.get("compile") else module
        try:
            with kernel_path(opts.get("path", "default")):
                step = fwd_bwd(runner, x, grad_out)
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = time_ms(step)
                peak = torch.cuda.max_memory_allocated() - base
                nbytes = measure_saved_bytes(runner, x).total
        except Exception as exc:  # a variant that fails is reported, the others still run
            emit(BENCH, "ffn_error", 0.0, "error", variant=label, error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        times[label], saved[label] = ms, nbytes
        emit(BENCH, "ffn_fwd_bwd", times[label], "ms", variant=label, tokens=rows, k=cfg.k, group=cfg.group,
             **SHAPE_350M)
        emit(BENCH, "ffn_saved_bytes", saved[label], "bytes", variant=label, per_token=saved[label] / rows)
        emit(BENCH, "ffn_peak_extra_memory", peak / 2**20, "MiB", variant=label)
        del module, runner
        torch.cuda.empty_cache()
    dense_names = [n for n in ("swiglu", "swiglu_compiled") if n in times]
    best_dense = min(dense_names, key=times.get)
    for label in times:
        emit(BENCH, "ffn_time_vs_best_dense", times[label] / times[best_dense], "x", variant=label, best_dense=best_dense,
             best_dense_ms=times[best_dense])
        emit(BENCH, "ffn_saved_vs_dense", saved[label] / saved["swiglu"], "x", variant=label)


# --- profile and micro-benchmarks ------------------------------------------------------------------


def profile_moc() -> None:
    from torch.profiler import ProfilerActivity, profile

    x = fresh(TOKENS, SHAPE_350M["d_model"]).requires_grad_(True)
    grad_out = fresh(TOKENS, SHAPE_350M["d_model"])
    for group in (None, "2:8"):
        module = build(FFNConfig(kind="moc", group=group, moc_kernel="triton", **SHAPE_350M))
        step = fwd_bwd(module, x, grad_out)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n=== profile: MoC triton {group or 'k512'}, 5 x fwd+bwd ===", file=sys.stderr)
        averages = prof.key_averages()
        try:
            table = averages.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70)
        except (AttributeError, KeyError):  # older torch names the column after CUDA
            table = averages.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70)
        print(table, file=sys.stderr, flush=True)


def micro() -> None:
    rows, d_model, d_ffn = TOKENS, SHAPE_350M["d_model"], SHAPE_350M["d_ffn"]
    x, grad_out = fresh(rows, d_model), fresh(rows, d_model)
    wg, wu, wd = fresh(d_ffn, d_model, scale=0.02), fresh(d_ffn, d_model, scale=0.02), fresh(d_model, d_ffn, scale=0.02)
    emit(BENCH, "micro_gate_up_two_gemms", time_ms(lambda: (F.linear(x, wg), F.linear(x, wu))), "ms")
    emit(BENCH, "micro_gate_up_cat_one_gemm", time_ms(lambda: F.linear(x, torch.cat((wg, wu)))), "ms")
    grad_gu = fresh(rows, 2 * d_ffn)
    emit(BENCH, "micro_grad_x_cat_one_gemm", time_ms(lambda: grad_gu @ torch.cat((wg, wu))), "ms")
    emit(BENCH, "micro_grad_x_mm_addmm",
         time_ms(lambda: torch.addmm(grad_gu[:, :d_ffn] @ wg, grad_gu[:, d_ffn:], wu)), "ms")
    # 2:8 activations are also 2:4: cuSPARSELt GEMMs for the products whose reduction runs over d_ffn.
    z = moc_train.group_forward(F.linear(x, wg), F.linear(x, wu), (2, 8), False, torch.int16, False).z_dense
    emit(BENCH, "micro_down_dense", time_ms(lambda: F.linear(z, wd)), "ms")
    try:
        packed = torch._cslt_compress(z)
        sparse_out = torch._cslt_sparse_mm(packed, wd.t())
        check(BENCH, "micro_cusparselt_matches_dense", rel_error(sparse_out, F.linear(z, wd)) < 1e-2)
        emit(BENCH, "micro_down_cusparselt_mm_only", time_ms(lambda: torch._cslt_sparse_mm(packed, wd.t())), "ms")
        emit(BENCH, "micro_down_cusparselt_compress", time_ms(lambda: torch._cslt_compress(z)), "ms")
        z2 = torch.cat((z, z), dim=1).contiguous()
        w_gate_up = torch.cat((wg, wu))
        packed2 = torch._cslt_compress(z2)
        emit(BENCH, "micro_grad_x_dense", time_ms(lambda: z2 @ w_gate_up), "ms")
        emit(BENCH, "micro_grad_x_cusparselt_mm_only", time_ms(lambda: torch._cslt_sparse_mm(packed2, w_gate_up)), "ms")
        emit(BENCH, "micro_grad_x_cusparselt_compress", time_ms(lambda: torch._cslt_compress(z2)), "ms")
    except Exception as exc:
        emit(BENCH, "micro_cusparselt_error", 0.0, "error", error=f"{type(exc).__name__}: {exc}"[:300])


# --- (c) training step, (d) largest batch ------------------------------------------------------------


def _model(preset: str, ffn: dict, loss_chunk_tokens: int = 0):
    from moc_lightning.models import ModelConfig, MoCTransformer

    torch.manual_seed(0)
    model = MoCTransformer(ModelConfig.from_preset(preset, ffn=ffn, loss_chunk_tokens=loss_chunk_tokens)).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _train_step(model, opt, ids, micro_batches: int = 1) -> None:
    for chunk in ids.chunk(micro_batches):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(chunk, labels=chunk).loss / micro_batches
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


STEP_FFNS = [("swiglu", {"kind": "swiglu"}), ("moc_k512", {"kind": "moc"}), ("moc_2:8", {"kind": "moc", "group": "2:8"})]


def bench_step(bsz: int = 128, seq: int = 256, steps: int = 6, loss_chunk_tokens: int = 0) -> None:
    results = {}
    for label, ffn in STEP_FFNS:
        model, opt = _model("llama-350m", ffn, loss_chunk_tokens)
        ids = torch.randint(0, model.cfg.vocab_size, (bsz, seq), device="cuda")
        micro_batches = 1
        while True:
            try:
                for _ in range(2):  # warm-up: kernels compile and autotune, the optimizer allocates its state
                    _train_step(model, opt, ids, micro_batches)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(steps):
                    _train_step(model, opt, ids, micro_batches)
                torch.cuda.synchronize()
                break
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                micro_batches *= 2
                if micro_batches > bsz:
                    raise
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / 1e9
        results[label] = (bsz * seq / seconds, peak)
        context = dict(model="llama-350m", ffn=label, bsz=bsz, seq=seq, micro_batches=micro_batches, steps=steps,
                       precision="bf16 autocast, fp32 weights, fused AdamW", loss_chunk_tokens=loss_chunk_tokens)
        emit(BENCH, "step_tokens_per_s", bsz * seq / seconds, "tokens/s", **context)
        emit(BENCH, "step_peak_memory", peak, "GB", **context)
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    for label, (tps, peak) in results.items():
        emit(BENCH, "step_tokens_per_s_vs_dense", tps / results["swiglu"][0], "x", model="llama-350m", ffn=label,
             loss_chunk_tokens=loss_chunk_tokens)
        emit(BENCH, "step_peak_memory_vs_dense", peak / results["swiglu"][1], "x", model="llama-350m", ffn=label,
             loss_chunk_tokens=loss_chunk_tokens)


def _fits(model, opt, bsz: int, seq: int) -> bool:
    ids = torch.randint(0, model.cfg.vocab_size, (bsz, seq), device="cuda")
    try:
        _train_step(model, opt, ids)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del ids
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def bench_max_batch(seq: int = 256, step: int = 8, budget_s: float = 100.0, loss_chunk_tokens: int = 0) -> None:
    results = {}
    for label, ffn in STEP_FFNS[:2]:
        model, opt = _model("llama-1b", ffn, loss_chunk_tokens)
        start, probes = time.perf_counter(), 0
        lo, hi = 0, None  # lo fits; hi does not
        bsz = 32
        while hi is None and time.perf_counter() - start < budget_s:  # grow by doubling until OOM
            probes += 1
            if _fits(model, opt, bsz, seq):
                lo, bsz = bsz, bsz * 2
            else:
                hi = bsz
        while hi is not None and hi - lo > step and time.perf_counter() - start < budget_s:
            mid = (lo + hi) // 2 // step * step
            probes += 1
            if _fits(model, opt, mid, seq):
                lo = mid
            else:
                hi = mid
        results[label] = lo
        emit(BENCH, "max_batch", lo, "sequences", model="llama-1b", ffn=label, seq=seq, resolution=step,
             first_oom=hi, probes=probes, seconds=time.perf_counter() - start,
             precision="bf16 autocast, fp32 weights, fused AdamW", loss_chunk_tokens=loss_chunk_tokens)
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    if results.get("swiglu"):
        emit(BENCH, "max_batch_vs_dense", results["moc_k512"] / results["swiglu"], "x", model="llama-1b",
             loss_chunk_tokens=loss_chunk_tokens)


PARTS = {"check": check_correctness, "elementwise": bench_elementwise, "ffn": bench_ffn, "step": bench_step, "maxbatch": bench_max_batch,
         "profile": profile_moc, "micro": micro}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="check,ffn,step,maxbatch", help="comma-separated parts to run")
    parser.add_argument("--extra", default="", help="extra parts: profile, micro")
    parser.add_argument("--loss-chunk-tokens", type=int, default=0, metavar="N",
                        help="step and maxbatch: ModelConfig.loss_chunk_tokens (0: the loss from the whole logits)")
    args = parser.parse_args(argv)
    parts = [p for p in (args.only + "," + args.extra).split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        print("moc_lightning.bench.train needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    for part in parts:
        start = time.perf_counter()
        kwargs = {"loss_chunk_tokens": args.loss_chunk_tokens} if part in ("step", "maxbatch") else {}
        result = PARTS[part](**kwargs)
        ok &= result is not False
        emit(BENCH, "part_seconds", time.perf_counter() - start, "s", part=part)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
