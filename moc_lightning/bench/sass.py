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
KERNELS = ("row_topk", "ordered_backward")
# Shared-memory traffic and CTA barriers: in a one-warp kernel, layout conversions.
SHARED_MEMORY_OPS = ("STS", "LDS", "BAR")


def _row_topk_source(chunk: int):
    """The bf16 word Top-K at the 350M benchmark's row (2736 channels: 1024 + 512 words held),
    int16 indices, one warp, 16-byte aligned rows."""
    from triton.compiler import ASTSource

    from moc_lightning.kernels import topk_triton as tk

    tk._import_triton()
    lanes, vec = tk.chunk_layout(chunk, 1)
    signature = {"words_ptr": "*i32", "out_ptr": "*i16", "n_pairs": "i32", "k": "i32", "in_row_stride": "i32",
                 "out_row_stride": "i32", "BLOCK_A": "constexpr", "BLOCK_B": "constexpr", "HAS_B": "constexpr",
                 "ASM": "constexpr", "LANES": "constexpr", "VEC": "constexpr", "ALIGNED": "constexpr"}
    constexprs = {"BLOCK_A": 1024, "BLOCK_B": 512, "HAS_B": True, "ASM": True, "LANES": lanes, "VEC": vec,
                  "ALIGNED": vec % 4 == 0}
    # _kernel binds the device functions the kernel calls, as the launcher does.
    return ASTSource(fn=tk._kernel(tk._bf16_pair_topk), signature=signature, constexprs=constexprs,
                     attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}), \
        {"num_warps": 1, "maxnreg": tk.PAIR_MAXNREG}


def _ordered_backward_source(chunk: int):
    """The ordered backward in its autotuner's first config (2 rows of 64 columns, 2 warps)."""
    from triton.compiler import ASTSource

    from moc_lightning.kernels import moc_train

    signature = {name: "*bf16" for name in ("GZ", "GS", "US", "SS", "ZS", "BUF")}
    signature.update({"IX": "*i16", "n_rows": "i32", "width": "i32", "kept": "i32", "s_gz": "i32", "s_c": "i32",
                      "s_buf": "i32", "STORED": "constexpr"})
    meta = moc_train._ordered_meta(2, 64)
    signature.update({name: "constexpr" for name in meta})
    order = ["GZ", "IX", "GS", "US", "SS", "ZS", "BUF", "n_rows", "width", "kept", "s_gz", "s_c", "s_buf", "STORED",
             *meta]
    signature = {name: signature[name] for name in order}
    return ASTSource(fn=moc_train._ordered_backward_kernel, signature=signature, constexprs={"STORED": False, **meta},
                     attrs={(i,): [["tt.divisibility", 16]] for i in range(7)}), {"num_warps": 2}


def compile_sass(kernel: str, chunk: int = 128) -> str:
    """SASS text of `kernel` (one of KERNELS) compiled for sm_90."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    source, options = (_row_topk_source if kernel == "row_topk" else _ordered_backward_source)(chunk)
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
        if args.sass_out:
            with open(args.sass_out, "w") as f:
                f.write(sass)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
