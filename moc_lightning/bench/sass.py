"""The Triton kernels compiled to Hopper (sm_90) SASS on this machine, no GPU needed: what each
kernel's machine code holds, as JSON lines.

    python -m moc_lightning.bench.sass [--kernel row_topk] [--chunk 128] [--sass-out row_topk.sass]

Triton compiles through its bundled `ptxas` for any target, so the layout a kernel gets (and
any shared-memory round trip Triton inserts between layouts) shows in the SASS before a GPU
call is spent. The counts are static (instructions in the code, not executed); ncu on the
device gives the executed ones. Run it with the Triton the GPU machine has for the same code
(stop 13 used `pip install --target DIR triton==3.6.0` and PYTHONPATH=DIR): versions lay out
the same kernel differently.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Optional

from moc_lightning.bench.common import emit

BENCH = "sass"
KERNELS = ("row_topk", "row_topk_mask", "mask_forward", "mask_backward", "decode_updown", "decode_updown_batch2",
           "decode_attention_step")
# Shared-memory traffic and CTA barriers: in a one-warp kernel, layout conversions.
SHARED_MEMORY_OPS = ("STS", "LDS", "BAR")
# Local-memory traffic: registers spilled.
LOCAL_MEMORY_OPS = ("STL", "LDL")


def _row_topk_source(chunk: int, mask_out: bool = False):
    """The bf16 word Top-K at the 350M benchmark's row (2736 channels: 1024 + 512 words held),
    int16 indices (or a bitmask: chunks of 128 words), one warp, 16-byte aligned rows."""
    from triton.compiler import ASTSource

    from moc_lightning.kernels import topk_triton as tk

    tk._import_triton()
    lanes, vec = tk.chunk_layout(tk.mask_chunk(1) if mask_out else chunk, 1)
    signature = {"words_ptr": "*i32", "out_ptr": "*i8" if mask_out else "*i16", "n_pairs": "i32", "k": "i32",
                 "in_row_stride": "i32", "out_row_stride": "i32", "mask_bytes": "i32", "BLOCK_A": "constexpr",
                 "BLOCK_B": "constexpr", "HAS_B": "constexpr", "ASM": "constexpr", "LANES": "constexpr",
                 "VEC": "constexpr", "ALIGNED": "constexpr", "MASK_OUT": "constexpr"}
    constexprs = {"BLOCK_A": 1024, "BLOCK_B": 512, "HAS_B": True, "ASM": True, "LANES": lanes, "VEC": vec,
                  "ALIGNED": vec % 4 == 0, "MASK_OUT": mask_out}
    # _kernel binds the device functions the kernel calls, as the launcher does.
    return ASTSource(fn=tk._kernel(tk._bf16_pair_topk), signature=signature, constexprs=constexprs,
                     attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}), \
        {"num_warps": 1, "maxnreg": tk.PAIR_MAXNREG}


def _mask_source(kernel: str, block_r: int = 1, words: int = 8, num_warps: int = 1):
    """The bitmask forward or backward, bf16, sm_90 PTX (popc, the sigmoid), in a (BLOCK_R, WORDS,
    warps) config: by default one row of 8 words on one warp (8 channels a thread)."""
    from triton.compiler import ASTSource

    from moc_lightning.kernels import moc_train

    if kernel == "mask_forward":
        fn, tensors, flag = moc_train._mask_forward_kernel, ("G", "U", "MASK", "ZD", "GS", "US", "SS", "ZS"), "STORE_SZ"
        ints = ("n_rows", "width", "n_words", "s_g", "s_u", "s_m", "s_zd", "s_c")
    else:
        fn, tensors, flag = moc_train._mask_backward_kernel, ("GZ", "MASK", "GS", "US", "SS", "ZS", "BUF"), "STORED"
        ints = ("n_rows", "width", "n_words", "s_gz", "s_m", "s_c", "s_buf")
    signature = {name: "*i32" if name == "MASK" else "*bf16" for name in tensors}
    signature.update({name: "i32" for name in ints})
    constexprs = {flag: False, "ASM": True, "BLOCK_R": block_r, "WORDS": words}
    signature.update({name: "constexpr" for name in constexprs})
    # Pointers, and the width and strides of the 350M rows (2736, 2 x 2736...), are multiples of 16:
    # Triton's launcher specializes such arguments, and vectorizes on it.
    aligned = [i for i, name in enumerate(signature) if name in tensors or name == "width" or name.startswith("s_")]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                     attrs={(i,): [["tt.divisibility", 16]] for i in aligned}), {"num_warps": num_warps}


def _decode_updown_source(rows: int = 1):
    """The MoC decode's up/down kernel as bf16 tokens at the 1B shapes run it (d 2048, d_ffn 5461,
    K 1024): one token (the batch-1 launch config, the threshold found in every program, the hint),
    or two (batch 2's: whole rows a token at a time, the partial in registers, both thresholds
    found in every program, the rounds of row slots pipelined)."""
    import triton
    from triton.compiler import ASTSource

    from moc_lightning.kernels import moc_decode as md

    cfg = md.launch_config(rows)
    d_model, d_ffn = 2048, 5461
    if rows == 1:
        per_rows = dict(R=min(cfg.updown_rows, cfg.updown_block_c), HINT=True, BY_TOKEN=False, ACC_REGS=False)
    else:
        per_rows = dict(R=cfg.updown_rows, HINT=False, BY_TOKEN=True, ACC_REGS=True)
    pointers = {"x_ptr": "*bf16", "wg_ptr": "*bf16", "g_ptr": "*fp32", "keys_ptr": "*i16", "hist_ptr": "*i32",
                "fine_ptr": "*i32", "thr_ptr": "*i64", "cut_ptr": "*i32", "wu_ptr": "*bf16", "wdt_ptr": "*bf16",
                "part_ptr": "*fp32", "hint_ptr": "*i32"}
    signature = {**pointers, **{name: "i32" for name in ("D", "F", "K", "GROUP_A", "GROUP_B", "B", "MAXR")}}
    assert not cfg.use_dot and rows <= cfg.select_here_rows  # what the two configs are
    constexprs = dict(T=rows, BLOCK_C=cfg.updown_block_c, BLOCK_D=cfg.updown_block_d,
                      SINGLE=d_model <= cfg.updown_block_d,
                      EXACT_D=d_model == cfg.updown_block_d, GATE_D=cfg.gate_block_d, USE_DOT=False, IEEE=False,
                      GROUPED=False, GROUP_P2=1, SELECT_HERE=True, N_PAD=triton.next_power_of_2(d_ffn),
                      RADIX_BITS=cfg.radix_bits, ROUND=1, POST_SILU=False, KEY16=True,
                      TOPK=md.HAS_TOPK, STAGES=cfg.updown_stages, PDL=cfg.pdl, **per_rows)
    signature.update({name: "constexpr" for name in constexprs})
    aligned = [i for i, name in enumerate(signature) if name in pointers or name in ("D", "MAXR")]
    return ASTSource(fn=md._kernel(md._updown_kernel), signature=signature, constexprs=constexprs,
                     attrs={(i,): [["tt.divisibility", 16]] for i in aligned}), {"num_warps": cfg.updown_warps}


def _decode_attention_step_source():
    """The decode attention's split kernel as a llama-1b decode step runs it: the fused step (RoPE,
    the cache write), bf16, 32 heads of 64 over a 256-slot cache at batch 1, the default launch."""
    import triton
    from triton.compiler import ASTSource

    from moc_lightning.kernels import decode_attention as da

    cfg = da.DEFAULT_LAUNCH
    splits, _ = cfg.pieces(32, 256)
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "ok_ptr": "*u8", "part_ptr": "*fp32",
                "kn_ptr": "*bf16", "vn_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64"}
    ints = ("L", "chunk", "H", "G", "q_sb", "q_sh", "k_sb", "k_sl", "k_sh", "v_sb", "v_sl", "v_sh", "ok_sb", "ok_sl",
            "kn_sb", "kn_sh", "vn_sb", "vn_sh", "cs_sb")
    signature = {**pointers, **{name: "i32" for name in ints[:4]}, "qk_scale": "fp32", **{name: "i32" for name in ints[4:]}}
    constexprs = dict(SPLITS=splits, D=64, D_PAD=64, BLOCK_L=cfg.block_l, STEP=True, PDL=cfg.pdl)
    signature.update({name: "constexpr" for name in constexprs})
    # pointers and the strides of 64-wide heads are multiples of 16, as the launcher specializes them
    aligned = [i for i, name in enumerate(signature) if name in pointers or name.endswith(("_sb", "_sl", "_sh"))
               and name not in ("ok_sl",)]
    return ASTSource(fn=da._kernel(da._split_kernel), signature=signature, constexprs=constexprs,
                     attrs={(i,): [["tt.divisibility", 16]] for i in aligned}), {"num_warps": cfg.warps}


def compile_sass(kernel: str, chunk: int = 128) -> str:
    """SASS text of `kernel` (one of KERNELS) compiled for sm_90."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel.startswith("mask_"):
        source, options = _mask_source(kernel)
    elif kernel == "decode_updown":
        source, options = _decode_updown_source()
    elif kernel == "decode_updown_batch2":
        source, options = _decode_updown_source(rows=2)
    elif kernel == "decode_attention_step":
        source, options = _decode_attention_step_source()
    else:
        source, options = _row_topk_source(chunk, mask_out=kernel == "row_topk_mask")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout


def opcode_counts(sass: str) -> Counter:
    """Static count of each opcode (predicates and modifiers dropped: `@P0 STG.E.U16` is STG)."""
    counts: Counter = Counter()
    for line in sass.splitlines():
        match = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            counts[match.group(1).split(".")[0]] += 1
    return counts


def wide_accesses(sass: str) -> int:
    """Global loads and stores of 16 bytes (LDG.E.128, STG.E.128, and LDGSTS.E[.BYPASS].128, the
    copies of a pipelined loop into shared memory): a dense tile read or written 8 bf16 a thread."""
    return len(re.findall(r"\b(?:LDG|STG)\.E\.128\b|\bLDGSTS\.E(?:\.BYPASS)?\.128\b", sass))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=KERNELS, action="append", help="default: all")
    parser.add_argument("--chunk", type=int, default=128, help="row_topk: words placed at a time")
    parser.add_argument("--sass-out", help="also write the (last) kernel's SASS to this file")
    args = parser.parse_args(argv)
    import triton

    for kernel in args.kernel or KERNELS:
        try:
            sass = compile_sass(kernel, args.chunk)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"moc_lightning.bench.sass: {kernel}: {exc}", file=sys.stderr)
            return 1
        counts = opcode_counts(sass)
        context = dict(kernel=kernel, target="sm_90", triton=triton.__version__,
                       **({"chunk": args.chunk} if kernel == "row_topk" else {}))
        emit(BENCH, "sass_instructions", sum(counts.values()), "instructions", **context,
             top=dict(counts.most_common(12)))
        emit(BENCH, "sass_shared_memory_ops", sum(counts[op] for op in SHARED_MEMORY_OPS), "instructions", **context,
             ops={op: counts[op] for op in SHARED_MEMORY_OPS})
        emit(BENCH, "sass_16_byte_accesses", wide_accesses(sass), "instructions", **context)
        emit(BENCH, "sass_local_memory_ops", sum(counts[op] for op in LOCAL_MEMORY_OPS), "instructions", **context,
             ops={op: counts[op] for op in LOCAL_MEMORY_OPS})
        if args.sass_out:
            with open(args.sass_out, "w") as f:
                f.write(sass)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
